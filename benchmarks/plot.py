"""Plot a bench_sp.py JSON: tokens/s per GPU and peak memory against sequence length, one line per
configuration (ulysses_sp solid, ALST dashed).

    python benchmarks/plot.py results.json            # writes results.png next to it
    python benchmarks/plot.py results.json -o fig.png
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
    """Successful runs grouped by configuration, sorted by length (configuration order kept)."""
    out: dict[str, list[dict]] = {}
    for run in data["runs"]:
        if run["status"] == "ok":
            out.setdefault(run["config"], []).append(run)
    return {config: sorted(runs, key=lambda r: r["seq_len"]) for config, runs in out.items()}


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
            style = "--" if runs[0]["side"] == "alst" else "-"
            ax.plot([r["seq_len"] for r in runs], [r[key] for r in runs], style, marker="o", label=config)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [_label(x) for x in lengths])
        ax.set_xlabel("sequence length (tokens)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    s = data["settings"]
    fig.suptitle(f"{s['model']} ({s['layers']} layers), {data['device']['name']} x {s['world_size']}, sp {s['sp']}, "
                 f"ZeRO-{s['zero_stage']}, {s['attn']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="JSON written by bench_sp.py")
    p.add_argument("-o", "--output", default=None, help="PNG path (default: the JSON's name with .png)")
    args = p.parse_args(argv)
    with open(args.results) as f:
        data = json.load(f)
    out = args.output or os.path.splitext(args.results)[0] + ".png"
    plot(data, out)
    print(out)


if __name__ == "__main__":
    main()
