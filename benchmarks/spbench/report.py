"""Results of one launch: environment and versions, every record, ratios, the rank-0 table, the JSON.

The JSON is rewritten (atomically) after every configuration, so a job that dies keeps what it
measured.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys

import torch

from ulysses_sp.train import flops

from . import sites

_ENV_KEYS = (
    "PYTORCH_CUDA_ALLOC_CONF",
    "NCCL_NVLS_ENABLE",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST",
    "NVSHMEM_DISABLE_NVLS",
    "TORCH_CUDNN_SDPA_DEPRIORITIZED",
    "CUDA_VISIBLE_DEVICES",
    "OMP_NUM_THREADS",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
)


def _version(dist_name: str) -> str | None:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nccl_version() -> str:
    version = torch.cuda.nccl.version()
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def _git_commit() -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        out = subprocess.run(
            ["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def environment(device: torch.device) -> dict:
    import ulysses_sp

    env = {
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "nccl": _nccl_version() if device.type == "cuda" else None,
            "transformers": _version("transformers"),
            "deepspeed": _version("deepspeed"),
            "flash_attn": _version("flash-attn") or _version("flash_attn"),
            "liger_kernel": _version("liger-kernel"),
            "accelerate": _version("accelerate"),
            "ulysses_sp": ulysses_sp.__version__,
            "ulysses_sp_git": _git_commit(),
        },
        "env": {k: os.environ[k] for k in _ENV_KEYS if k in os.environ},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device"] = {
            "name": props.name,
            "count": torch.cuda.device_count(),
            "memory_gib": props.total_memory / 2**30,
            "capability": f"{props.major}.{props.minor}",
        }
    else:
        env["device"] = {"name": f"cpu ({platform.processor() or platform.machine()})", "count": os.cpu_count()}
    return env


def command_line() -> dict:
    """The script's argv and the launcher line it most likely came from (torchrun sets the env)."""
    argv = [os.path.relpath(sys.argv[0]) if os.path.isabs(sys.argv[0]) else sys.argv[0], *sys.argv[1:]]
    nproc = os.environ.get("LOCAL_WORLD_SIZE")
    launcher = f"torchrun --nproc_per_node {nproc} " if nproc and "TORCHELASTIC_RUN_ID" in os.environ else "python "
    return {"argv": sys.argv, "command": launcher + shlex.join(argv)}


class Results:
    """Everything measured in this launch; rank 0 prints and writes."""

    def __init__(self, path: str | None, settings: dict, device: torch.device, rank: int):
        self.path, self.rank = path, rank
        self.data = {
            "command": command_line(),
            "settings": settings,
            **environment(device),
            "mfu_formula": flops.FORMULA,
            "comm_method": _COMM_METHOD,
            "runs": [],
            "searches": [],
        }

    def add_run(self, record: dict) -> None:
        self.data["runs"].append(record)
        self.data["ratios"] = ratios(self.data["runs"], self.data["settings"]["baseline"])
        self.data["parity"] = parity(self.data["runs"])
        self.data["memory_site_slopes"] = sites.slopes(self.data["runs"])
        self.write()

    def add_search(self, result: dict) -> None:
        self.data["searches"].append(result)
        self.write()

    def write(self) -> None:
        if self.rank != 0 or not self.path:
            return
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)

    def log(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    def table(self) -> str:
        return format_table(self.data)


_COMM_METHOD = (
    "one extra profiled step per configuration (torch.profiler, CUDA activity); per GPU, "
    "exposed = time NCCL kernels run while no compute kernel (non-NCCL kernel, memcpy, memset) runs; "
    "a2a = NCCL send/recv and all-to-all kernels, comm = all NCCL kernels; max and mean over ranks"
)


def ratios(runs: list[dict], baseline: str) -> list[dict]:
    """Each configuration against ``baseline`` at the same length (both ok): <1 is faster/smaller."""
    base = {r["seq_len"]: r for r in runs if r["config"] == baseline and r["status"] == "ok"}
    out = []
    for r in runs:
        b = base.get(r["seq_len"])
        if r["config"] == baseline or r["status"] != "ok" or b is None:
            continue
        out.append(
            {
                "seq_len": r["seq_len"],
                "config": r["config"],
                "baseline": baseline,
                "step_time": r["step_s"] / b["step_s"],
                "tok_s_per_gpu": r["tok_s_per_gpu"] / b["tok_s_per_gpu"],
                "peak_mem": r["peak_mem_gib"] / b["peak_mem_gib"],
            }
        )
    return out


def parity(runs: list[dict]) -> list[dict]:
    """Per length and other side (alst, hf): the first step's loss (before any update) of the first
    ours config that ran against that side's first. Same weights and batch on every side: equal up
    to kernel rounding, or the comparison is off."""
    out = []
    for seq in sorted({r["seq_len"] for r in runs}):
        first = {}
        for r in runs:
            if r["seq_len"] == seq and r["status"] == "ok" and r["side"] not in first:
                first[r["side"]] = r
        if "ours" not in first:
            continue
        for side, other in first.items():
            if side == "ours":
                continue
            a, b = first["ours"]["losses"][0], other["losses"][0]
            out.append(
                {
                    "seq_len": seq,
                    "ours_config": first["ours"]["config"],
                    "other_config": other["config"],
                    "loss_ours": a,
                    "loss_other": b,
                    "abs_diff": abs(a - b),
                    "rel_diff": abs(a - b) / abs(b),
                }
            )
    return out


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def engine_name(settings: dict) -> str:
    """The engine the sides ran under, as the table and the plot name it (older JSONs: DeepSpeed)."""
    return "FSDP2" if settings.get("engine") == "fsdp2" else f"ZeRO-{settings['zero_stage']}"


def _header(data: dict) -> list[str]:
    st, v = data["settings"], data["versions"]
    versions = "  ".join(f"{k} {v[k]}" for k in ("torch", "transformers", "deepspeed", "flash_attn", "liger_kernel"))
    return [
        f"device: {data['device']['name']} x {st['world_size']}  |  {versions}",
        (
            f"model {st['model']} ({st['layers']} layers), attn {st['attn']}, sp {st['sp']}, {engine_name(st)}, "
            f"MFU vs {st['peak_flops'] / 1e12:.0f} TFLOP/s per GPU; a2a/comm exp = exposed ms (max over ranks); "
            "peak GiB = the configuration's own (max allocated minus what was allocated before its build), "
            "of the whole step and of its forward + backward (fwd+bwd)"
        ),
    ]


def _row(r: dict, width: int) -> str:
    ok, comm = r["status"] == "ok", r.get("comm", {})
    return (
        f"{r['seq_len']:>8} {r['config']:<{width}} {r['status']:<6} {_fmt(r.get('step_s'), '8.3f'):>8} "
        f"{_fmt(r.get('tok_s_per_gpu'), '10.0f'):>10} {_fmt(r.get('tflops_per_gpu'), '8.1f'):>8} "
        f"{_fmt(r['mfu'] * 100 if ok else None, '6.1f'):>6} {_fmt(r.get('peak_mem_gib'), '9.2f'):>9} "
        f"{_fmt(r.get('peak_fwd_bwd_gib'), '8.2f'):>8} "
        f"{_fmt(comm.get('a2a_exposed_ms', {}).get('max'), '8.1f'):>8} "
        f"{_fmt(comm.get('comm_exposed_ms', {}).get('max'), '9.1f'):>9} "
        f"{_fmt(r['losses'][0] if ok else None, '8.4f'):>8}"
    )


def format_table(data: dict) -> str:
    width = max([28] + [len(r["config"]) for r in data["runs"]])
    lines = _header(data)
    if data["runs"]:
        lines += [
            "",
            (
                f"{'seq':>8} {'config':<{width}} {'status':<6} {'step s':>8} {'tok/s/GPU':>10} {'TFLOP/s':>8} "
                f"{'MFU%':>6} {'peak GiB':>9} {'fwd+bwd':>8} {'a2a exp':>8} {'comm exp':>9} {'loss@1':>8}"
            ),
        ]
        lines += [_row(r, width) for r in data["runs"]]
    if data.get("ratios"):
        lines += [
            "",
            (
                f"ratios vs {data['settings']['baseline']} (step time <1 = faster; tok/s >1 = faster; "
                "peak memory <1 = smaller)"
            ),
            f"{'seq':>8} {'config':<{width}} {'step time':>10} {'tok/s/GPU':>10} {'peak mem':>9}",
        ]
        lines += [
            f"{x['seq_len']:>8} {x['config']:<{width}} {x['step_time']:>10.3f} {x['tok_s_per_gpu']:>10.3f} "
            f"{x['peak_mem']:>9.3f}"
            for x in data["ratios"]
        ]
    if data.get("parity"):
        pairs = ", ".join(
            f"{p['seq_len']}: {p['loss_ours']:.5f} vs {p['other_config']} {p['loss_other']:.5f} "
            f"(rel {p['rel_diff']:.1e})"
            for p in data["parity"]
        )
        lines += ["", f"parity (first-step loss, same weights and batch): {pairs}"]
    lines += _sites_lines(data)
    for x in data.get("searches", []):
        fit = x.get("memory_fit") or {}
        lines.append(
            f"max length {x['config']}: fits {_fmt(x['max_fit'], 'd')}, first OOM {_fmt(x['first_oom'], 'd')} "
            f"(limited by {x['limited_by']}, {x['spent_s']:.0f} s; linear memory fit "
            f"{_fmt(fit.get('kib_per_sequence_token'), '.1f')} KiB/token -> "
            f"{_fmt(fit.get('extrapolated_max_len'), 'd')} extrapolated)"
        )
    return "\n".join(lines)


def _sites_lines(data: dict) -> list[str]:
    """The --memory-sites tables: live allocations at each run's forward + backward peak, then each
    site's growth per token where a configuration ran at two lengths (sites.py)."""
    gib, kib = 2**30, 2**10
    lines = []
    for r in data["runs"]:
        m = r.get("memory_sites")
        if not m:
            continue
        inside = m["peak_inside_op"]
        lines += [
            "",
            f"memory at the fwd+bwd peak, {r['config']} at {r['seq_len']} ({m['tokens']} local tokens): allocated "
            f"{m['state_peak_bytes'] / gib:.2f} GiB between ops, {m['peak_inside_op_bytes'] / gib:.2f} GiB inside "
            f"{inside['op']} (its own {inside['own_bytes'] / gib:.2f} GiB)",
        ]
        lines += [f"{x['bytes'] / gib:>9.3f} GiB {x['blocks']:>5} blocks  {x['site']}" for x in m["sites"]]
    for x in data.get("memory_site_slopes", []):
        lines += [
            "",
            f"growth per local token, {x['config']} ({x['tokens'][0]} -> {x['tokens'][1]} tokens): "
            f"{x['state_peak_bytes_per_token'] / kib:.1f} KiB between ops, "
            f"{x['peak_inside_op_bytes_per_token'] / kib:.1f} KiB at the peak inside an op",
        ]
        lines += [
            f"{s['bytes_per_token'] / kib:>9.2f} KiB  {s['site']}"
            for s in x["sites"]
            if abs(s["bytes_per_token"]) >= kib / 4
        ]
    return lines
