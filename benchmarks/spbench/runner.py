"""Measure one configuration at one sequence length; search the longest sequence that fits.

Every rank runs the same sequence of collectives, and every decision is taken on values all ranks
agree on (all-reduced), so no rank waits in a collective the others skipped:

* a configuration runs in two phases, each inside ``try``: build (fresh model + DeepSpeed engine +
  batch), then steps (warm-up, timed steps: barrier, step, device sync, the slowest rank's time;
  optionally one profiled step);
* a failure is an "oom" (out-of-memory) or an "error" (traceback printed by the rank that raised);
  after each phase all ranks all-reduce the worst status, so a rank whose build failed does not
  leave the others alone in the steps' collectives; then the run is freed (engine.destroy, gc,
  empty_cache) on every rank and the next configuration starts together.

Within a phase this relies on the ranks failing at the same point, which an OOM of an SP group
does: every rank allocates the same shapes. A rank failing alone while the others wait inside an
NCCL collective cannot be recovered in-process; the NCCL watchdog ends the job after
``--timeout-s`` and the JSON keeps every configuration finished before.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
import traceback
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from ulysses_sp.train import flops

from . import comm, sites
from .workload import Workload, synchronize

_STATUS = {0: "ok", 1: "oom", 2: "error"}


@dataclass(frozen=True)
class Measure:
    warmup: int
    steps: int
    profile: bool
    sites: bool = False  # one more forward + backward, where its peak memory goes (sites.py)


def _world_max(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _memory(device: torch.device) -> tuple[float, float]:
    """(peak allocated, peak reserved) in GiB since the last reset; CPU: the process' max RSS twice."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, torch.cuda.max_memory_reserved(device) / 2**30
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    return rss, rss


def zero_partition_ranks(model: torch.nn.Module) -> int | None:
    """Ranks a ZeRO-3 parameter is partitioned over (None: not a ZeRO-3 parameter)."""
    group = getattr(next(model.parameters()), "ds_process_group", None)
    return None if group is None else dist.get_world_size(group)


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def _aggregate(summaries: list[dict]) -> dict:
    """Max and mean over ranks of each scalar of :func:`comm.summarize`; rank 0's kernel lists."""
    errors = {rank: s["error"] for rank, s in enumerate(summaries) if "error" in s}
    if errors:
        return {"errors": errors}
    out = {}
    for key, value in summaries[0].items():
        if isinstance(value, (int, float)):
            vals = [s[key] for s in summaries]
            out[key] = {"max": max(vals), "mean": sum(vals) / len(vals)}
    out["nccl_kinds_rank0"] = summaries[0]["nccl_kinds"]
    out["top_kernels_rank0"] = summaries[0]["top_kernels"]
    return out


def _step(run) -> torch.Tensor:
    loss = run.forward_backward()
    run.update()
    return loss


def _timed(run, workload: Workload, measure: Measure, record: dict, build_peak: float) -> None:
    """Warm-up and timed steps. Peak memory per step, reset at its start: of the whole step, and of its
    forward and backward alone (the optimizer's step can peak higher and hide how activations grow)."""
    device = workload.device
    times, losses, norms = [], [], []
    step_peak = fb_peak = 0.0
    for _ in range(measure.warmup + measure.steps):
        dist.barrier()
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        loss = run.forward_backward()
        fb_peak = max(fb_peak, _memory(device)[0])
        run.update()
        synchronize(device)
        times.append(time.perf_counter() - start)
        step_peak = max(step_peak, _memory(device)[0])
        losses.append(float(loss))
        norms.append(_grad_norm(run.engine))
    times = _world_max(times, device)
    record.update(
        losses=losses,
        grad_norms=norms,
        step_times_s=times,
        warmup_steps=measure.warmup,
        step_s=statistics.median(times[measure.warmup :]),
    )
    before = record.get("mem_before_gib", 0.0)
    reserved = _memory(device)[1]
    own, peak, fb, reserved, build = _world_max(
        [step_peak - before, step_peak, fb_peak - before, reserved, build_peak - before], device
    )
    record.update(
        peak_mem_gib=own,
        peak_mem_abs_gib=peak,
        peak_fwd_bwd_gib=fb,
        peak_reserved_gib=reserved,
        build_peak_mem_gib=build,
    )
    if measure.profile and device.type == "cuda":
        dist.barrier()
        start = time.perf_counter()
        loss, summary = comm.profile_step(lambda: _step(run))
        record["profiled_step_s"] = _world_max([time.perf_counter() - start], device)[0]
        losses.append(float(loss))
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, summary)
        record["comm"] = _aggregate(gathered)
    if measure.sites:
        dist.barrier()
        tokens = run.batch["input_ids"].numel()  # this rank's tokens, the "s" of the site names
        record["memory_sites"] = sites.measure(run.forward_backward, run.model, device, tokens)
        run.update()


def _failure(exc: BaseException, phase: str, spec: str, seq_len: int, record: dict) -> int:
    """Record a failure on this rank: 1 for out-of-memory, 2 for anything else (traceback printed)."""
    message = str(exc).splitlines()[0] if str(exc) else ""
    record.setdefault("error", f"{phase}: {type(exc).__name__}: {message}")
    if is_oom(exc):
        return 1
    print(f"[rank {dist.get_rank()}] {spec} at {seq_len} failed in {phase}:\n{traceback.format_exc()}", flush=True)
    return 2


def _agree(code: int, device: torch.device) -> int:
    """The worst status over all ranks (every rank calls this at the same points)."""
    return int(_world_max([code], device)[0])


def run_config(
    side, spec: str, levers: frozenset[str], seq_len: int, workload: Workload, measure: Measure, peak_flops: float
) -> dict:
    """Build, warm up, time (and profile) one configuration; never raises for OOM or step errors."""
    device = workload.device
    record = {
        "config": spec,
        "side": side.name,
        "levers": sorted(levers),
        "seq_len": seq_len,
        "batch_size": workload.batch_size,
    }
    free_memory(device)
    # each configuration compiles afresh: a graph cached by the one before (same layer code) would make
    # dynamo retrace for a second length with dynamic shapes, a path no single-length run takes
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        record["mem_before_gib"] = torch.cuda.memory_allocated(device) / 2**30
    wall = time.perf_counter()
    run, shape, code, build_peak = None, None, 0, 0.0
    try:
        run = side.prepare(levers, seq_len)
        shape = flops.shape_of(run.model)
        record["zero_partition_ranks"] = zero_partition_ranks(run.model)
        synchronize(device)
        record["build_s"] = time.perf_counter() - wall
        build_peak = _memory(device)[0]
        if device.type == "cuda":  # the step's peak, not the full model materialised before ZeRO-3 shards it
            torch.cuda.reset_peak_memory_stats(device)
    except Exception as exc:
        code = _failure(exc, "build", spec, seq_len, record)
    code = _agree(code, device)  # a rank that failed to build does not enter the steps' collectives alone
    if code == 0:
        try:
            # the sites name our and transformers' modules; ALST's runs are timed without them
            _timed(run, workload, replace(measure, sites=measure.sites and side.name != "alst"), record, build_peak)
        except Exception as exc:
            code = _failure(exc, "steps", spec, seq_len, record)
        # dynamo's count of graph breaks over this configuration's steps (0: each compiled layer is one graph)
        record["graph_breaks"] = sum(torch._dynamo.utils.counters["graph_break"].values())
    code = _agree(code, device)
    if run is not None:
        try:
            run.close()
        except Exception as exc:
            print(f"[rank {dist.get_rank()}] closing {spec}: {type(exc).__name__}: {exc}", flush=True)
    run = None
    free_memory(device)
    record["wall_s"] = _world_max([time.perf_counter() - wall], device)[0]
    record["status"] = _STATUS[code]
    if code:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, record.pop("error", None))
        record["errors"] = {rank: e for rank, e in enumerate(errors) if e}
    if device.type == "cuda":
        record["mem_after_free_gib"] = torch.cuda.memory_allocated(device) / 2**30
    if record["status"] == "ok":
        world = dist.get_world_size()
        sequences = workload.batch_size * (world // workload.sp)
        step_flops = flops.step_flops(shape, seq_len, sequences)
        record.update(
            model_shape=shape.to_dict(),
            tokens_per_step=seq_len * sequences,
            tok_s_per_gpu=seq_len * sequences / record["step_s"] / world,
            model_flops_per_step=step_flops,
            tflops_per_gpu=step_flops / record["step_s"] / world / 1e12,
            mfu=flops.mfu(step_flops, record["step_s"], world, peak_flops),
        )
    return record


@dataclass(frozen=True)
class Search:
    start: int
    max_len: int
    granularity: int
    budget_s: float
    steps: int


def search_max_len(
    side, spec: str, levers: frozenset[str], workload: Workload, search: Search, peak_flops: float, log=print
) -> dict:
    """Longest sequence (a multiple of ``granularity`` and sp) for which one training step fits.

    Doubling from ``start`` until an OOM, then bisection between the last fit and the first OOM
    down to ``granularity``. Before each attempt its duration is predicted from the last fitting
    attempt (build time + steps x step time x (S / S_fit)^2: attention-bound, an upper bound) and
    the search stops when the prediction exceeds what is left of ``budget_s``; the result then says
    ``limited_by: budget`` and ``max_fit`` is a lower bound.
    """
    unit = math.lcm(search.granularity, workload.sp)
    measure = Measure(warmup=0, steps=search.steps, profile=False)
    attempts, fit, oom, spent, limited = [], None, None, 0.0, None

    def predicted(seq: int) -> float:
        if fit is None:
            return 0.0
        last = next(a for a in reversed(attempts) if a["seq_len"] == fit)
        return last["build_s"] + sum(last["step_times_s"]) * (seq / fit) ** 2

    def attempt(seq: int) -> str | None:
        nonlocal fit, oom, spent, limited
        if predicted(seq) > search.budget_s - spent:
            limited = "budget"
            return None
        rec = run_config(side, spec, levers, seq, workload, measure, peak_flops)
        attempts.append(rec)
        spent += rec["wall_s"]
        log(
            f"  search {spec}: {seq:>9} tokens -> {rec['status']}"
            + (f" ({rec['peak_mem_gib']:.1f} GiB, {rec['step_s']:.2f} s/step)" if rec["status"] == "ok" else "")
        )
        if rec["status"] == "ok":
            fit = seq if fit is None else max(fit, seq)
        elif rec["status"] == "oom":
            oom = seq if oom is None else min(oom, seq)
        else:
            limited = "error"
        return rec["status"]

    seq = max(unit, search.start // unit * unit)
    while limited is None and fit is None:  # a first fit: the start, halved while it does not fit
        if seq > search.max_len:
            limited = "search_max"
        elif attempt(seq) == "oom":
            if seq <= unit:
                break  # nothing fits
            seq = max(unit, seq // 2 // unit * unit)
    while limited is None and fit is not None and oom is None:  # doubling
        if fit * 2 > search.max_len:
            limited = "search_max"
        else:
            attempt(fit * 2)
    while limited is None and fit is not None and oom is not None and oom - fit > unit:  # bisection
        attempt((fit + oom) // 2 // unit * unit)
    return {
        "config": spec,
        "side": side.name,
        "levers": sorted(levers),
        "unit": unit,
        "max_fit": fit,
        "first_oom": oom,
        "limited_by": limited or "oom",
        "spent_s": spent,
        "attempts": attempts,
        "memory_fit": _memory_fit(attempts, workload.device),
    }


def _memory_fit(attempts: list[dict], device: torch.device) -> dict | None:
    """Least-squares peak_mem = a + b * S over the fitting attempts (the absolute peak: what meets the
    device's memory), and where it meets the device memory: an extrapolation (labelled so), useful
    when the search stopped on its budget."""
    pts = [(a["seq_len"], a["peak_mem_abs_gib"]) for a in attempts if a["status"] == "ok"]
    if len({s for s, _ in pts}) < 2:
        return None
    n = len(pts)
    mean_s, mean_m = sum(s for s, _ in pts) / n, sum(m for _, m in pts) / n
    b = sum((s - mean_s) * (m - mean_m) for s, m in pts) / sum((s - mean_s) ** 2 for s, _ in pts)
    a = mean_m - b * mean_s
    fit = {"gib_at_zero": a, "kib_per_sequence_token": b * 2**20}
    if device.type == "cuda" and b > 0:
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        fit["device_gib"] = total
        fit["extrapolated_max_len"] = int((total - a) / b)
    return fit
