"""Exposed communication time of one training step, from the GPU kernel timeline.

Method: one extra step (after the timed ones) runs under ``torch.profiler`` recording CUDA activity
only. From its kernel intervals on this GPU:

* compute  = every non-NCCL kernel, memcpy and memset (anything that keeps the GPU busy);
* a2a      = NCCL send/recv and all-to-all kernels (Ulysses' re-sharding; both sides issue
             ``all_to_all_single``, which NCCL runs as grouped send/recv);
* comm     = every NCCL kernel (a2a plus ZeRO all-gathers / reduce-scatters, small all-gathers).

``exposed(X) = |union(X) \\ union(compute)|``: the time X runs while no compute kernel runs, i.e.
the time the step would lose if X were infinitely fast and everything else stayed put. An NCCL
kernel's interval includes waiting for slower peers, so rank skew counts as exposed comm (it is
time this GPU idles). Reported per rank; the report takes the max and the mean over ranks.
The profiled step is not one of the timed steps (the profiler adds overhead); its own duration is
reported next to the timed median.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable

import torch

_NCCL = re.compile(r"nccl", re.IGNORECASE)
_NCCL_KIND = re.compile(
    r"nccl\w*?(SendRecv|AllToAll|AllGather|ReduceScatter|AllReduce|Broadcast|Reduce|Send|Recv)", re.IGNORECASE
)
_A2A_KINDS = {"sendrecv", "alltoall", "send", "recv"}

Interval = tuple[float, float]  # (start, end) in microseconds


def merge(intervals: Iterable[Interval]) -> list[Interval]:
    """Union of intervals as a sorted list of disjoint intervals."""
    out: list[list[float]] = []
    for start, end in sorted(intervals):
        if end <= start:
            continue
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(s, e) for s, e in out]


def length(merged: list[Interval]) -> float:
    return sum(e - s for s, e in merged)


def uncovered(merged: list[Interval], cover: list[Interval]) -> float:
    """Measure of ``merged`` minus ``cover`` (both disjoint and sorted, from :func:`merge`)."""
    total, j = 0.0, 0
    for start, end in merged:
        cursor = start
        while j < len(cover) and cover[j][1] <= cursor:
            j += 1
        k = j
        while k < len(cover) and cover[k][0] < end:
            c_start, c_end = cover[k]
            if c_start > cursor:
                total += c_start - cursor
            cursor = max(cursor, c_end)
            if cursor >= end:
                break
            k += 1
        if cursor < end:
            total += end - cursor
    return total


def kind(name: str) -> str:
    """'compute', or the NCCL collective a kernel belongs to (lower case, e.g. 'sendrecv')."""
    if not _NCCL.search(name):
        return "compute"
    match = _NCCL_KIND.search(name)
    return match.group(1).lower() if match else "nccl_other"


def summarize(kernels: Iterable[tuple[str, float, float]], top: int = 8) -> dict:
    """Exposed-communication summary of one step's kernels ``(name, start_us, end_us)``; times in ms."""
    by_kind: dict[str, list[Interval]] = defaultdict(list)
    per_name: dict[str, float] = defaultdict(float)
    for name, start, end in kernels:
        by_kind[kind(name)].append((start, end))
        per_name[name] += end - start
    if not per_name:
        raise ValueError("the profiled step recorded no GPU kernels")
    compute = merge(by_kind.get("compute", []))
    a2a = merge(iv for k, ivs in by_kind.items() if k in _A2A_KINDS for iv in ivs)
    comm = merge(iv for k, ivs in by_kind.items() if k != "compute" for iv in ivs)
    everything = merge(iv for ivs in by_kind.values() for iv in ivs)
    ms = 1e-3
    kinds = {}
    for k, ivs in sorted(by_kind.items()):
        if k == "compute":
            continue
        merged = merge(ivs)
        kinds[k] = {"total_ms": length(merged) * ms, "exposed_ms": uncovered(merged, compute) * ms}
    return {
        "span_ms": (everything[-1][1] - everything[0][0]) * ms,
        "compute_busy_ms": length(compute) * ms,
        "a2a_total_ms": length(a2a) * ms,
        "a2a_exposed_ms": uncovered(a2a, compute) * ms,
        "comm_total_ms": length(comm) * ms,
        "comm_exposed_ms": uncovered(comm, compute) * ms,
        "nccl_kinds": kinds,
        "top_kernels": [[name, t * ms] for name, t in sorted(per_name.items(), key=lambda x: -x[1])[:top]],
    }


def gpu_kernels(prof) -> list[tuple[str, float, float]]:
    """``(name, start_us, end_us)`` of every device-side event of a finished ``torch.profiler`` run."""
    device = torch.autograd.DeviceType.CUDA
    return [(e.name, e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == device]


def profile_step(step_fn):
    """Run ``step_fn()`` under the profiler (CUDA activity only); returns (its result, summary dict).

    Errors of the step itself propagate (an OOM is an OOM); a profiler that does not start or a
    trace that cannot be analysed gives ``{"error": ...}`` instead of a summary, so a profiling
    problem never discards the configuration's timings.
    """
    from torch.profiler import ProfilerActivity, profile

    try:
        prof = profile(activities=[ProfilerActivity.CUDA])
        prof.start()
    except Exception as exc:
        return step_fn(), {"error": f"profiler did not start: {type(exc).__name__}: {exc}"}
    try:
        result = step_fn()
        torch.cuda.synchronize()
    finally:
        prof.stop()
    try:
        return result, summarize(gpu_kernels(prof))
    except Exception as exc:
        return result, {"error": f"trace analysis failed: {type(exc).__name__}: {exc}"}
