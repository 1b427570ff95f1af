"""Plot bench_sp.py JSONs: tokens/s per GPU and peak memory against sequence length, one line per
configuration (ulysses_sp solid, ALST dashed); max-length search attempts are lines of their own.

    python benchmarks/plot.py results.json            # writes results.png next to it
    python benchmarks/plot.py a.json b.json -o fig.png
"""

from __future__ import annotations

import argparse
import json
import os


def _label(tokens: int) -> str:
    if tokens < 1024:
        return str(tokens)
    return f"{tokens / 1024:g}K" if tokens < 1 << 20 else f"{tokens / 2**20:g}M"


def series(data: dict) -> dict[str, list[dict]]:
    """Successful runs grouped by configuration, sorted by length (configuration order kept); each
    search's successful attempts as the configuration ``<config> (search)`` (one step each)."""
    out: dict[str, list[dict]] = {}
    for run in data["runs"]:
        if run["status"] == "ok":
            out.setdefault(run["config"], []).append(run)
    gpus = data["settings"]["world_size"]
    for search in data.get("searches", []):
        for a in search["attempts"]:
            if a["status"] == "ok":
                point = dict(a, side=search["side"], tok_s_per_gpu=a["seq_len"] / a["step_s"] / gpus)
                out.setdefault(f"{search['config']} (search)", []).append(point)
    return {config: sorted(runs, key=lambda r: r["seq_len"]) for config, runs in out.items()}


def merged(datasets: list[dict]) -> dict:
    """One dataset of several JSONs of the same model and device (runs and searches concatenated;
    configurations of later files keep their names, prefixed by the attention kernel when it differs)."""
    base = dict(datasets[0], runs=[], searches=[])
    for data in datasets:
        tag = "" if data["settings"]["attn"] == datasets[0]["settings"]["attn"] else f"{data['settings']['attn']}: "
        base["runs"] += [dict(r, config=tag + r["config"]) for r in data["runs"]]
        base["searches"] += [dict(s, config=tag + s["config"]) for s in data.get("searches", [])]
    return base


def plot(data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = series(data)
    if not groups:
        raise SystemExit("no successful run in the JSON: nothing to plot")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = [("tok_s_per_gpu", "tokens / s / GPU"), ("peak_mem_gib", "peak memory per GPU (GiB)")]
    lengths = sorted({r["seq_len"] for runs in groups.values() for r in runs})
    for ax, (key, title) in zip(axes, panels):
        for config, runs in groups.items():
            if key == "tok_s_per_gpu" and config.endswith("(search)"):
                continue  # one untimed step per search attempt: memory only
            style = "--" if runs[0]["side"] == "alst" else "-"
            ax.plot([r["seq_len"] for r in runs], [r[key] for r in runs], style, marker="o", label=config)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [_label(x) for x in lengths])
        ax.set_xlabel("sequence length (tokens)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    for ax in axes:
        ax.legend(fontsize=7)
    s = data["settings"]
    engine = "FSDP2" if s.get("engine") == "fsdp2" else f"ZeRO-{s['zero_stage']}"  # older JSONs: DeepSpeed
    tagged = sorted({c.split(": ")[0] for c in groups if ": " in c})
    note = f" (lines tagged {', '.join(tagged)}: that kernel)" if tagged else ""
    fig.suptitle(
        f"{s['model']} ({s['layers']} layers), {data['device']['name']} x {s['world_size']}, sp {s['sp']}, "
        f"{engine}, {s['attn']}{note}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="JSON(s) written by bench_sp.py (same model and device)")
    p.add_argument("-o", "--output", default=None, help="PNG path (default: the first JSON's name with .png)")
    args = p.parse_args(argv)
    datasets = []
    for path in args.results:
        with open(path) as f:
            datasets.append(json.load(f))
    out = args.output or os.path.splitext(args.results[0])[0] + ".png"
    plot(merged(datasets), out)
    print(out)


if __name__ == "__main__":
    main()
