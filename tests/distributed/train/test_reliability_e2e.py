"""launch/train.py end to end on CPU: evaluation under SP, determinism, exact resume (same and other
SP size, torch and DeepSpeed engines) and what the ranks do when one of them raises, dies or stalls.

Launches are shared: one uninterrupted SP run (torchrun, sp=2) and its non-SP twin serve the eval,
determinism and resume comparisons. Failures are injected from outside the trainer: a rank
started in a directory without the (relative) dataset path, a SIGKILL, a SIGSTOP. Those runs
start the ranks directly (RANK / WORLD_SIZE / MASTER_* in the environment, as a multi-node
launcher would), so nothing but the trainer's own handling ends the surviving rank.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.distributed.train.test_train_e2e import TRAIN, train_command
from tests.helpers import ROOT, flags, free_port, launcher_command, run_ok, subprocess_env
from ulysses_sp.train.checkpoints import find_checkpoint

ZERO3 = os.path.join(ROOT, "configs", "deepspeed", "zero3.json")
pytestmark = pytest.mark.slow

COMMON = [
    "--device",
    "cpu",
    "--model",
    "tiny-llama-gqa",
    "--steps",
    "6",
    "--lr",
    "3e-3",
    "--seed",
    "3",
    "--seq-len",
    "48",
    "--batch-size",
    "1",
    "--grad-accum",
    "2",
]
EVAL = ["--eval-every", "3", "--eval-batches", "2"]
SLACK_S = 30  # process start, imports and the grace for the other ranks' notes, on a loaded 2-core machine


def _launch(tmp_path, name, nproc, *args, launcher="torchrun"):
    """Run train.py to completion; returns {"train": {step: row}, "eval": {step: row}}."""
    metrics = tmp_path / f"{name}.jsonl"
    run_ok(train_command(nproc, ["--metrics", str(metrics), *args], "python" if nproc == 1 else launcher), cwd=tmp_path)
    return _read(metrics)


def _read(metrics) -> dict:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {
        "train": {r["step"]: r for r in rows if "loss" in r},
        "eval": {r["step"]: r for r in rows if "eval_loss" in r},
    }


def _start_ranks(nproc, args, cwds):
    """Start the ranks of one job directly (no launcher), each in its own working directory.

    The ranks run at a lower priority than the test: on a 2-core machine two busy ranks would
    otherwise starve the test's polling and its signal would land steps later than planned."""
    env = subprocess_env(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc)
    )
    procs = []
    for rank, cwd in enumerate(cwds):
        cwd.mkdir(parents=True, exist_ok=True)
        procs.append(
            subprocess.Popen(
                [sys.executable, TRAIN, *args],
                cwd=cwd,
                text=True,
                env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                preexec_fn=lambda: os.nice(10),
            )
        )
    return procs


def _wait_for_step(metrics, step: int, procs, limit_s: float = 300) -> None:
    deadline = time.monotonic() + limit_s
    while not (
        metrics.exists()
        and any(
            json.loads(line).get("step", 0) >= step and "loss" in json.loads(line)
            for line in metrics.read_text().splitlines()
        )
    ):
        assert all(p.poll() is None for p in procs), [p.communicate()[0][-3000:] for p in procs]
        assert time.monotonic() < deadline, "the run never reached the step"
        time.sleep(0.1)


def _finish(proc, limit_s: float) -> tuple[int, str, float]:
    start = time.monotonic()
    try:
        out, _ = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"rank still running {limit_s:.0f} s later:\n{proc.communicate()[0][-3000:]}")
    return proc.returncode, out, time.monotonic() - start


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """6 steps at sp=2 (eval and checkpoints every 3 steps) and the same run without SP."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    sp2 = _launch(tmp, "sp2", 2, *COMMON, *EVAL, "--sp-size", "2", "--save-dir", str(tmp / "ckpt"), "--save-every", "3")
    ref = _launch(tmp, "ref", 1, *COMMON, *EVAL, "--sp-size", "1")
    return {"dir": tmp, "sp2": sp2, "ref": ref}


def _close(a: float, b: float, rtol: float) -> bool:
    return abs(a - b) <= rtol * abs(b)


def test_eval_under_sp_equals_non_sp(uninterrupted):
    sp2, ref = uninterrupted["sp2"], uninterrupted["ref"]
    assert sorted(sp2["eval"]) == sorted(ref["eval"]) == [3, 6]
    for step in (3, 6):
        a, b = sp2["eval"][step], ref["eval"][step]
        assert a["eval_tokens"] == b["eval_tokens"] > 0 and a["eval_batches"] == 2
        assert _close(a["eval_loss"], b["eval_loss"], 1e-5), (step, a, b)
    assert sp2["eval"][6]["eval_loss"] < sp2["eval"][3]["eval_loss"], "evaluation did not see the model learn"
    for step in range(1, 7):
        assert _close(sp2["train"][step]["loss"], ref["train"][step]["loss"], 1e-4)


def test_killed_rank_ends_the_job_then_resume_is_exact(uninterrupted, tmp_path):
    """Determinism (same seed, same losses bit for bit), a SIGKILLed rank ending the other with a report,
    and resuming the killed run from its step-3 checkpoint: steps 4-6 and the eval equal the
    uninterrupted run exactly."""
    sp2 = uninterrupted["sp2"]
    metrics = tmp_path / "killed.jsonl"
    args = [*COMMON, *EVAL, *flags(sp_size=2, save_dir=tmp_path / "ckpt", save_every=3, metrics=metrics, timeout_s=20)]
    procs = _start_ranks(2, args, [tmp_path, tmp_path])
    _wait_for_step(metrics, 4, procs)  # the step-3 checkpoint is complete before step 4 starts
    procs[1].send_signal(signal.SIGKILL)
    code, out, _ = _finish(procs[0], 20 + SLACK_S)
    assert procs[1].wait() == -signal.SIGKILL, "rank 1 finished the run before the signal reached it"
    assert code != 0, out[-3000:]
    # Where rank 0 notices depends on how far it got before the signal landed: a later step, the
    # evaluation or the last save.
    where = r"(step [4-6]|evaluation after step 6|saving step 6)"
    assert re.search(rf"CollectiveFailure: rank 0: a collective failed at {where}", out), out[-3000:]
    assert "rank(s) [1] stayed silent" in out, out[-3000:]
    killed = _read(metrics)
    for step in killed["train"]:
        assert killed["train"][step]["loss"] == sp2["train"][step]["loss"], step  # bit-identical
    assert killed["eval"][3]["eval_loss"] == sp2["eval"][3]["eval_loss"]

    # the save directory names its newest complete step: 3, or 6 when the signal landed after that save
    assert find_checkpoint(str(tmp_path / "ckpt")).step in (3, 6)
    resumed = _launch(
        tmp_path, "resumed", 2, *COMMON, *EVAL, "--sp-size", "2", "--resume", str(tmp_path / "ckpt" / "step_00000003")
    )
    assert sorted(resumed["train"]) == [4, 5, 6]
    for step in (4, 5, 6):
        for key in ("loss", "lr", "grad_norm", "tokens"):
            assert resumed["train"][step][key] == sp2["train"][step][key], (step, key)
    assert resumed["eval"][6]["eval_loss"] == sp2["eval"][6]["eval_loss"]


def test_resume_at_another_sp_size(uninterrupted, tmp_path):
    """The sp=2 run's step-3 checkpoint resumed without SP (sp=1, one process): the same curve within fp32 noise."""
    sp2, ref = uninterrupted["sp2"], uninterrupted["ref"]
    resumed = _launch(
        tmp_path,
        "sp1",
        1,
        *COMMON,
        *EVAL,
        "--sp-size",
        "1",
        "--resume",
        str(uninterrupted["dir"] / "ckpt" / "step_00000003"),
    )
    assert sorted(resumed["train"]) == [4, 5, 6]
    for step in (4, 5, 6):
        assert _close(resumed["train"][step]["loss"], sp2["train"][step]["loss"], 1e-5), step
        assert _close(resumed["train"][step]["loss"], ref["train"][step]["loss"], 1e-5), step
        assert resumed["train"][step]["lr"] == sp2["train"][step]["lr"]
    assert _close(resumed["eval"][6]["eval_loss"], sp2["eval"][6]["eval_loss"], 1e-5)


_FREED_PROBE = """
import gc, json, os, sys, weakref
gc.disable()  # only run()'s own collection may free what sits in reference cycles
sys.path.insert(0, sys.argv.pop(1))
out_dir = sys.argv.pop(1)
import train
from ulysses_sp.train import loop

refs = {}
start = loop.TrainingRun.start.__func__


def spy(cls, args):
    run = start(cls, args)
    refs.update(run=weakref.ref(run), model=weakref.ref(run.model), engine=weakref.ref(run.engine),
                topology=weakref.ref(run.topology))
    return run


loop.TrainingRun.start = classmethod(spy)
train.main(sys.argv[1:])
alive = sorted(name for name, ref in refs.items() if ref() is not None)
with open(os.path.join(out_dir, f"alive_{os.environ['RANK']}.json"), "w") as f:  # one file per rank: no interleaving
    json.dump(alive, f)
"""


def test_successful_run_frees_its_objects_before_exit(tmp_path):
    """After a successful run every rank has freed the model, the engine and the topology (with its
    process groups) inside ``ulysses_sp.train.run.run``: they sit in reference cycles, and left to the interpreter's
    finalization, freeing gloo objects that hold tensors can abort a rank at exit
    (docs/troubleshooting.md). gc is off in the ranks, so only run()'s own collection frees them."""
    probe = tmp_path / "probe.py"
    probe.write_text(_FREED_PROBE)
    cmd = launcher_command("torchrun", 2, probe, os.path.dirname(TRAIN), tmp_path, *COMMON, *flags(sp_size=2))
    run_ok(cmd, cwd=tmp_path)
    for rank in (0, 1):
        alive = json.loads((tmp_path / f"alive_{rank}.json").read_text())
        assert alive == [], f"rank {rank}: still alive after run() returned: {alive}"


def test_rank_refusing_its_own_files_says_so(tmp_path):
    """Rank 1 cannot read the dataset (its working directory lacks the relative path), rank 0 can: rank 1
    refuses before joining and says why with its rank (exit 2); rank 0, waiting for it, fails after
    --timeout-s saying that a rank did not join and where to look. No launcher: a launcher would stop
    rank 0 as soon as rank 1 exits."""
    (tmp_path / "rank0").mkdir()
    (tmp_path / "rank0" / "data.txt").write_text("\n\n".join(f"document {i} " * 30 for i in range(40)))
    procs = _start_ranks(
        2,
        [*COMMON, *flags(sp_size=2, dataset="data.txt", timeout_s=10)],
        [tmp_path / "rank0", tmp_path / "rank1"],
    )
    code1, out1, _ = _finish(procs[1], 60 + SLACK_S)
    code0, out0, took = _finish(procs[0], 60 + SLACK_S)
    assert code1 == 2 and "[rank 1] ulysses_sp: --dataset data.txt: dataset path 'data.txt' does not exist" in out1
    assert "Traceback" not in out1, out1
    assert code0 != 0 and took < 10 + SLACK_S, out0[-3000:]
    assert "not every rank joined the job within --timeout-s 10" in out0, out0[-3000:]


def test_stalled_rank_times_out(tmp_path):
    """A SIGSTOPped rank: the other's collective times out after --timeout-s and it exits naming rank 1."""
    metrics = tmp_path / "stalled.jsonl"
    procs = _start_ranks(
        2,
        [*COMMON, "--steps", "200", "--sp-size", "2", "--timeout-s", "5", "--metrics", str(metrics)],
        [tmp_path, tmp_path],
    )
    _wait_for_step(metrics, 2, procs)
    procs[1].send_signal(signal.SIGSTOP)
    try:
        code, out, took = _finish(procs[0], 5 + SLACK_S)
    finally:
        procs[1].kill()
        procs[1].wait()
    assert code != 0 and took >= 4, (took, out[-3000:])
    assert "Timed out" in out and "rank(s) [1] stayed silent" in out, out[-3000:]


def test_deepspeed_resume_exact_and_at_another_world_size(uninterrupted, tmp_path):
    """ZeRO-3, sp=2, 2 micro-batches per step: resuming at sp=2 continues exactly; at sp=1 (world 1)
    after DeepSpeed's universal conversion, within fp32 noise (model, optimizer and scheduler state
    all carried over). One update per step, not per DeepSpeed micro-step: the learning rate follows the
    torch engine's schedule, and step 2's loss (after one Adam step, which the config's betas do not
    change) equals the torch engine's."""
    args = [*COMMON, *EVAL, "--dtype", "fp32", "--deepspeed", ZERO3]
    full = _launch(
        tmp_path, "ds_full", 2, *args, *flags(sp_size=2, save_dir=tmp_path / "ckpt", save_every=3), launcher="deepspeed"
    )
    ref = uninterrupted["ref"]["train"]
    assert [full["train"][s]["lr"] for s in range(1, 7)] == [ref[s]["lr"] for s in range(1, 7)]
    assert _close(full["train"][1]["loss"], ref[1]["loss"], 1e-5) and _close(
        full["train"][2]["loss"], ref[2]["loss"], 1e-4
    )
    step3 = tmp_path / "ckpt" / "step_00000003"
    resumed = _launch(tmp_path, "ds_resumed", 2, *args, "--sp-size", "2", "--resume", str(step3), launcher="deepspeed")
    for step in (4, 5, 6):
        assert resumed["train"][step]["loss"] == full["train"][step]["loss"], step
        assert resumed["train"][step]["lr"] == full["train"][step]["lr"], step
    assert resumed["eval"][6]["eval_loss"] == full["eval"][6]["eval_loss"]  # evaluation through the ZeRO-3 engine
    state = step3 / "deepspeed"
    run_ok(
        [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(state / "state"),
            "--output_folder",
            str(state / "universal"),
        ],
        timeout=300,
    )
    sp1 = _launch(tmp_path, "ds_sp1", 1, *args, "--sp-size", "1", "--resume", str(step3))
    for step in (4, 5, 6):
        assert _close(sp1["train"][step]["loss"], full["train"][step]["loss"], 1e-5), step
        assert sp1["train"][step]["lr"] == full["train"][step]["lr"], step
