"""launch/train.py end to end on CPU: the loss curve of an SP run equals the matching non-SP run
(same seed, same global batch) within 1e-4 relative in fp32, through torchrun and the deepspeed
launcher, for sp=2, sp=4 with a length not divisible by 4, dp2 x sp2, and hybrid SP (Ulysses x ring)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, launcher_command, run_ok, subprocess_env
from ulysses_sp.train.presets import build_config

TRAIN = os.path.join(ROOT, "launch", "train.py")
pytestmark = pytest.mark.slow


def train_command(nproc: int, args, launcher: str = "torchrun") -> list[str]:
    """launch/train.py under torchrun, the deepspeed launcher, or plain python (one process)."""
    if launcher == "python":
        assert nproc == 1, nproc
        return [sys.executable, TRAIN, *args]
    return launcher_command(launcher, nproc, TRAIN, *args)


def _shm_segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("deepspeed_allreduce_buffer_")}


def train(tmp_path, name, nproc, *args, launcher="torchrun"):
    metrics = tmp_path / f"{name}.jsonl"
    shm_before = _shm_segments()
    out = run_ok(train_command(nproc, ["--device", "cpu", "--metrics", str(metrics), *args], launcher), cwd=tmp_path)
    # the deepspeed launcher turns on DeepSpeed's CPU shm all-reduce; its segments are RAM until reboot
    left = _shm_segments() - shm_before
    assert not left, f"{name}: DeepSpeed /dev/shm segments left behind: {sorted(left)}"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows = [r for r in rows if "eval_loss" not in r]  # the training steps (--eval-every adds evaluation rows)
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)) and rows
    for r in rows:
        assert r["tokens"] > 0 and r["tok_per_s"] > 0 and r["peak_mem_gb"] > 0
    # the end-of-run summary, once (rank 0): steps, tokens, throughput, memory, the final loss, where metrics went
    summary = [line for line in out.stderr.splitlines() if "done: " in line]
    assert len(summary) == 1 and f"done: {len(rows)} steps" in summary[0], out.stderr[-3000:]
    assert f"final loss {rows[-1]['loss']:.4f}" in out.stderr and f"metrics: {metrics}" in out.stderr
    if "--memory" in args:  # the plan is logged, and its prediction next to the measured peak
        assert "--memory auto: --grad-ckpt" in out.stderr and "--memory auto predicted a peak of" in out.stderr
    assert {r["loss_path"] for r in rows} == {"full"}  # tiny vocabularies: the logits always fit
    return [r["loss"] for r in rows]


def assert_same_curve(sp_losses, ref_losses):
    assert len(sp_losses) == len(ref_losses) == 5
    for step, (a, b) in enumerate(zip(sp_losses, ref_losses), 1):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: SP loss {a} vs non-SP {b}"
    assert ref_losses[-1] < ref_losses[0], "the run did not train"


COMMON = ["--model", "tiny-llama-gqa", "--steps", "5", "--lr", "3e-3", "--seed", "3"]


def test_sp2_matches_single_process(tmp_path):
    args = [*COMMON, "--seq-len", "64", "--batch-size", "2", "--grad-accum", "2"]
    ref = train(tmp_path, "ref", 1, "--sp-size", "1", *args)
    assert_same_curve(train(tmp_path, "sp2", 2, "--sp-size", "2", "--memory", "auto", *args), ref)


def test_sp4_uneven_length_packed_matches_single_process(tmp_path):
    args = [*COMMON, "--seq-len", "30", "--batch-size", "1", "--pack", "--grad-accum", "2"]  # 30 % 4 != 0
    ref = train(tmp_path, "ref", 1, "--sp-size", "1", *args)
    assert_same_curve(train(tmp_path, "sp4", 4, "--sp-size", "4", *args), ref)


def test_hybrid_sp4_ring2_fewer_heads_than_sp_matches_single_process(tmp_path):
    """sp 4 on a model with 2 heads (fewer than sp): --ring-size auto picks 2 Ulysses x 2 ring ranks;
    30 tokens are padded to 32."""
    config = tmp_path / "qwen3_2h.json"
    build_config("tiny-qwen3", num_attention_heads=2).to_json_file(config)
    args = [*COMMON, "--model", str(config), "--seq-len", "30", "--batch-size", "1", "--pack", "--grad-accum", "2"]
    ref = train(tmp_path, "ref", 1, "--sp-size", "1", *args, launcher="python")
    assert_same_curve(train(tmp_path, "ring", 4, "--sp-size", "4", "--ring-size", "auto", *args), ref)


def test_dp2_sp2_matches_dp2(tmp_path):
    args = [*COMMON, "--seq-len", "48", "--batch-size", "1", "--pack"]
    ref = train(tmp_path, "dp2", 2, "--sp-size", "1", *args)
    assert_same_curve(train(tmp_path, "dp2sp2", 4, "--sp-size", "2", *args), ref)


def test_deepspeed_launcher_sp2_matches_single_process(tmp_path):
    args = [*COMMON, "--seq-len", "40", "--batch-size", "1", "--pack"]
    ref = train(tmp_path, "ref", 1, "--sp-size", "1", *args)
    assert_same_curve(train(tmp_path, "ds_sp2", 2, "--sp-size", "2", *args, launcher="deepspeed"), ref)


@pytest.mark.parametrize("stages", [(0, 3)], ids=["zero0+3"])
def test_deepspeed_zero_stages_sp2_match_non_sp(tmp_path, stages):
    """ZeRO 0 and 3 at sp=2 (deepspeed launcher, shipped configs) reproduce the non-SP DeepSpeed run;
    ZeRO-3 with every memory feature of the trainer on (checkpointing, tiled MLP, RMSNorm recompute).
    ZeRO 1 and 2 through the launcher: the accelerate DeepSpeed YAML test (ZeRO-2) and
    distributed/integrations/test_deepspeed.py (every stage through the library), for CI time."""
    args = [*COMMON, "--seq-len", "40", "--batch-size", "1", "--pack", "--dtype", "fp32"]
    config = lambda stage: os.path.join(ROOT, "configs", "deepspeed", f"zero{stage}.json")  # noqa: E731
    ref = train(tmp_path, "ds_ref", 1, "--sp-size", "1", "--deepspeed", config(0), *args, launcher="deepspeed")
    for stage in stages:
        memory = ["--grad-ckpt", "--tiled-mlp", "--recompute-norms"] if stage == 3 else []
        got = train(
            tmp_path,
            f"zero{stage}",
            2,
            "--sp-size",
            "2",
            "--deepspeed",
            config(stage),
            *args,
            *memory,
            launcher="deepspeed",
        )
        assert_same_curve(got, ref)


def test_bad_flag_fails_at_once_with_one_message(tmp_path):
    """Two ranks, a flag no run can use: the job ends with exit code 2 before any process group, rank 0
    says what was wrong once, the other rank stays quiet, and no rank prints a traceback of its own."""
    cmd = train_command(2, ["--device", "cpu", "--seq-len", "1"])
    out = subprocess.run(
        cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False
    )
    message = "--seq-len must be an integer >= 2"
    assert out.returncode != 0 and (out.stdout + out.stderr).count(message) == 1, out.stderr[-3000:]
    assert "ValueError" not in out.stderr and "[rank 1]" not in out.stderr, out.stderr[-3000:]
