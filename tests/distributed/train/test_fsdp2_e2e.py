"""launch/train.py --fsdp end to end on CPU (the FSDP2 engine) under hybrid SP, a ring of 2 ((u, r) =
(1, 2)): the loss curve and the held-out evaluation (train/evaluation.py on the ring's layout) equal
the non-SP run within 1e-4 relative (fp32), with selective checkpointing, the tiled MLP and the
RMSNorm recompute on (and compiled layers in the resume at sp1); resuming is exact at the same layout
and close at another one (sp1). (Ulysses alone, dp2 x sp2, under configs/accelerate/fsdp2_sp2.yaml:
distributed/integrations/test_accelerate_launch.py.)"""

from __future__ import annotations

import json

import pytest

from tests.distributed.train.test_train_e2e import COMMON, assert_same_curve, train, train_command
from tests.helpers import run_ok
from ulysses_sp.train.checkpoints import META_FILE

pytestmark = pytest.mark.slow

FSDP = ["--fsdp", "--grad-ckpt", "selective", "--tiled-mlp", "--recompute-norms"]
# the compiled layers' path, once (aot_eager: no Inductor C++ build, minutes on CI's 2 cores)
COMPILED = ["--compile", "aot_eager"]
ARGS = [*COMMON, "--seq-len", "40", "--batch-size", "1", "--pack", "--eval-every", "3", "--eval-batches", "2"]
RING = ["--sp-size", "2", "--ring-size", "2"]


def _resume(tmp_path, name, nproc, *args, launcher="torchrun") -> dict[int, dict]:
    """A resumed run's metrics rows by step (``train`` expects steps from 1)."""
    metrics = tmp_path / f"{name}.jsonl"
    run_ok(train_command(nproc, ["--device", "cpu", "--metrics", str(metrics), *args], launcher), cwd=tmp_path)
    return _rows(metrics)


def _rows(path, key: str = "loss") -> dict[int, dict]:
    """The training rows (``key="eval_loss"``: the evaluation rows) of a metrics file by step."""
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines()) if key in r}


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-4 * abs(b)


def test_fsdp2_ring_matches_single_process_and_resumes(tmp_path):
    """sp2 --ring-size 2 --fsdp against one process (the torch engine), training and evaluation; its
    step-3 checkpoint resumed at the same layout (under the deepspeed launcher) gives steps 4-5 and
    the step-5 evaluation bit for bit, and at sp1 (one process, compiled layers) within 1e-4."""
    ref = train(tmp_path, "ref", 1, "--sp-size", "1", *ARGS, launcher="python")
    save = ["--save-dir", str(tmp_path / "ckpt"), "--save-every", "3"]
    assert_same_curve(train(tmp_path, "fsdp_ring", 2, *RING, *ARGS, *FSDP, *save), ref)
    assert (tmp_path / "ckpt" / "step_00000003" / "fsdp2" / ".metadata").is_file()
    meta = json.loads((tmp_path / "ckpt" / "step_00000003" / META_FILE).read_text())
    assert (meta["sp_size"], meta["ring_size"]) == (2, 2), meta  # the run was the ring's
    evals, ref_evals = _rows(tmp_path / "fsdp_ring.jsonl", "eval_loss"), _rows(tmp_path / "ref.jsonl", "eval_loss")
    assert sorted(evals) == sorted(ref_evals) == [3, 5]
    for step in (3, 5):
        assert evals[step]["eval_tokens"] == ref_evals[step]["eval_tokens"] > 0, step
        assert _close(evals[step]["eval_loss"], ref_evals[step]["eval_loss"]), step

    full = _rows(tmp_path / "fsdp_ring.jsonl")
    resume = ["--resume", str(tmp_path / "ckpt" / "step_00000003")]
    # resumed under the deepspeed launcher: --fsdp is launched by it as by torchrun
    resumed = _resume(tmp_path, "resumed_ring", 2, *RING, *ARGS, *FSDP, *resume, launcher="deepspeed")
    assert sorted(resumed) == [4, 5]
    for step in (4, 5):
        for key in ("loss", "lr", "grad_norm"):
            assert resumed[step][key] == full[step][key], (step, key)
    assert _rows(tmp_path / "resumed_ring.jsonl", "eval_loss")[5]["eval_loss"] == evals[5]["eval_loss"]
    other = _resume(tmp_path, "resumed_sp1", 1, "--sp-size", "1", *ARGS, *FSDP, *COMPILED, *resume, launcher="python")
    for step in (4, 5):
        assert _close(other[step]["loss"], full[step]["loss"]), step
        assert other[step]["lr"] == full[step]["lr"], step
    assert _close(_rows(tmp_path / "resumed_sp1.jsonl", "eval_loss")[5]["eval_loss"], evals[5]["eval_loss"])
