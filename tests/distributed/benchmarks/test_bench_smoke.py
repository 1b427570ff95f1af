"""benchmarks/bench_sp.py end to end on 2 CPU ranks (gloo): both sides (and the levers that run on
CPU) run every length, every number in the JSON is finite, and ulysses_sp and DeepSpeed ALST give
the same first-step loss on the same weights and batch (the comparison is like for like), with or
without levers (ours' tiled MLP, checkpoint offload and selective checkpointing included); with
``--memory-sites`` each of ours' runs names what was live at its peak. Then benchmarks/plot.py
renders it. ALST's ``ac_offload`` runs through its context but offloads nothing on CPU (DeepSpeed
skips CPU tensors); exposed communication needs CUDA."""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile

import pytest

from tests.distributed import harness
from tests.helpers import ROOT, flags, launcher_command, run_ok, subprocess_env

pytestmark = harness.cpu_only("the benchmark's CPU smoke run (the GPU benchmark is benchmarks/bench_sp.py itself)")

BENCH = os.path.join(ROOT, "benchmarks", "bench_sp.py")
SEQ_LENS = (64,)  # one length: CI time (the bench loops lengths alike)
CONFIGS = ("alst+tiled_mlp+ac_offload", "ours+sac+cudnn", "ours+tiled_mlp+offload+sac+norms")  # [0]: the baseline


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results.json"
    env = subprocess_env()
    cmd = [
        *launcher_command("torchrun", 2, BENCH),
        "--device",
        "cpu",
        "--model",
        "tiny-llama",
        "--seq-lens",
        ",".join(map(str, SEQ_LENS)),
        "--steps",
        "2",
        "--warmup",
        "1",
        "--layers",
        "2",
        "--attn",
        "sdpa",
        "--configs",
        ",".join(CONFIGS),
        "--memory-sites",
        "--out",
        str(out),
    ]
    proc = run_ok(cmd, timeout=300, env=env, cwd=out.parent)
    assert "parity (first-step loss" in proc.stdout  # the rank-0 table was printed
    return out, json.loads(out.read_text())


def test_both_sides_every_length_finite_numbers(results):
    _, data = results
    runs = {(r["config"], r["seq_len"]): r for r in data["runs"]}
    assert set(runs) == {(c, s) for c in CONFIGS for s in SEQ_LENS}
    for r in runs.values():
        assert r["status"] == "ok", r
        for key in (
            "step_s",
            "tok_s_per_gpu",
            "tflops_per_gpu",
            "mfu",
            "peak_mem_gib",
            "peak_mem_abs_gib",
            "model_flops_per_step",
            "build_s",
            "wall_s",
        ):
            assert _finite(r[key]) and r[key] > 0, (key, r[key])
        assert len(r["losses"]) == 3 and all(_finite(x) for x in r["losses"])
        assert r["zero_partition_ranks"] == 2  # ZeRO-3 shards over both ranks on both sides
        assert r["graph_breaks"] == 0  # dynamo's count: nothing here is compiled
    assert {x["config"] for x in data["ratios"]} == set(CONFIGS[1:])
    assert all(_finite(x["step_time"]) and _finite(x["peak_mem"]) for x in data["ratios"])
    assert data["command"]["command"].startswith("torchrun --nproc_per_node 2 ")
    assert data["versions"]["deepspeed"] and data["versions"]["torch"] and "mfu_formula" in data


def test_memory_sites_of_ours_runs(results):
    """--memory-sites on CPU: each of ours' runs names the storages live at its peak (sum = the peak,
    by ops of the step's phases); ALST's runs are timed without."""
    _, data = results
    for r in data["runs"]:
        if r["side"] == "alst":
            assert "memory_sites" not in r
            continue
        m = r["memory_sites"]
        assert m["tokens"] == r["seq_len"] // 2 and m["state_peak_bytes"] > 0, m
        assert sum(x["bytes"] for x in m["sites"]) == m["state_peak_bytes"], m
        assert all(x["site"].split()[0] in ("fwd", "rec", "bwd") for x in m["sites"]), m["sites"]


def test_same_first_step_loss_on_both_sides(results):
    _, data = results
    assert [p["seq_len"] for p in data["parity"]] == list(SEQ_LENS)
    for p in data["parity"]:
        assert p["rel_diff"] <= 1e-2, p  # bf16 weights; identical kernels give ~0 on CPU
    for seq in SEQ_LENS:  # the levers change no numerics
        first = {r["config"]: r["losses"][0] for r in data["runs"] if r["seq_len"] == seq}
        ref = first["ours+sac+cudnn"]
        assert all(abs(v - ref) <= 1e-2 * abs(ref) for v in first.values()), first


FSDP2_CONFIGS = ("hf", "ours+sac")


def test_fsdp2_engine_both_sides():
    """``--engine fsdp2`` at sp=1 over 2 data-parallel ranks: the plain model and ours, each sharded by
    FSDP2 with the same AdamW and clipping, follow the same loss curve (same weights, same batch)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        cmd = [
            *launcher_command("torchrun", 2, BENCH),
            *("--device", "cpu", "--model", "tiny-llama", "--layers", "2", "--attn", "sdpa", "--sp", "1"),
            *("--engine", "fsdp2", "--seq-lens", "64", "--steps", "2", "--warmup", "1", "--no-profile"),
            *("--configs", ",".join(FSDP2_CONFIGS), "--out", out),
        ]
        run_ok(cmd, timeout=300, env=subprocess_env(), cwd=tmp)
        with open(out) as f:
            data = json.load(f)
    assert data["settings"]["engine"] == "fsdp2"
    runs = {r["config"]: r for r in data["runs"]}
    assert set(runs) == set(FSDP2_CONFIGS) and all(r["status"] == "ok" for r in runs.values()), runs
    hf, ours = runs["hf"], runs["ours+sac"]
    for r in (hf, ours):
        assert r["zero_partition_ranks"] is None and len(r["losses"]) == 3
        assert all(_finite(n) and n > 0 for n in r["grad_norms"]), r["grad_norms"]
    for key in ("losses", "grad_norms"):  # three steps: the gradients and updates agree too
        for a, b in zip(hf[key], ours[key]):
            assert abs(a - b) <= 1e-3 * abs(a), (key, hf[key], ours[key])


def test_plot(results):
    from benchmarks import plot  # matplotlib: a test extra, so CI draws the plot too

    path, _ = results
    png = path.with_suffix(".png")
    plot.main([str(path), "-o", str(png)])
    assert png.stat().st_size > 10_000


def _table(stdout: str, names) -> dict[str, list[str]]:
    """The rows of a benchmark's printed table whose first word is one of ``names``."""
    rows = [line.split() for line in stdout.splitlines()]
    return {words[0]: words[1:] for words in rows if words and words[0] in names}


def _output(cmd: list[str]) -> str:
    return run_ok(cmd, timeout=300).stdout


def test_cpu_memory_benchmarks():
    """benchmarks/cpu_memory.py (one process) and cpu_memory_sp.py (2 SP ranks) at a small size (bf16
    matmuls are slow on CPU: d=512 and 1024 tokens took 2 min on 2 cores): every configuration
    prints, and RMSNorm recompute lowers the peak (it keeps no fp32 copies)."""
    single = _output(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "cpu_memory.py"),
            *flags(layers=1, tokens=512, hidden=256, ffn=512, norm_tile_elements=4096),
        ]
    )
    rows = _table(single, ("full+tiled_mlp", "full+tiled_mlp+norms"))
    assert float(rows["full+tiled_mlp+norms"][1]) < float(rows["full+tiled_mlp"][1]), single  # peak MiB
    sp = _output(
        launcher_command(
            "torchrun",
            2,
            os.path.join(ROOT, "benchmarks", "cpu_memory_sp.py"),
            *flags(layers=1, tokens=512, hidden=256, ffn=512),
        )
    )
    rows = _table(sp, ("full+tiled_mlp", "full+tiled_mlp+norms"))
    peaks = {name: max(float(x) for x in row[:6]) for name, row in rows.items()}
    assert len(peaks) == 2 and peaks["full+tiled_mlp+norms"] < peaks["full+tiled_mlp"], sp
    assert float(rows["full+tiled_mlp+norms"][3]) > 0 and float(rows["full+tiled_mlp"][3]) == 0, sp  # norm phase
