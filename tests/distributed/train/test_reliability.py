"""Reliability checks that need processes (two spawns of 2 ranks):

* the collective timeout reaches every process group (torch gives new groups the backend default);
* errors raised by the same check on every rank of the SP group, before any collective can hang:
  local shards of different shapes, negative or non-integer position ids;
* checkpoint round trips through the trainer (TrainingRun) for the torch engine and DeepSpeed ZeRO
  stages 0-3 at sp=2, with attention dropout on, so the continued losses equal the uninterrupted
  ones only if the model, optimizer, scheduler, data position and random streams are all restored.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import ulysses_sp
from tests.distributed import harness
from tests.helpers import ROOT, tiny_model, tokens
from ulysses_sp.core import comm
from ulysses_sp.train.cli import parse_config
from ulysses_sp.train.loop import TrainingRun
from ulysses_sp.train.plan import make_plan
from ulysses_sp.train.presets import build_config

HARNESS_TIMEOUT = timedelta(seconds=300)  # harness.py's init_process_group timeout


def _body_groups_and_input_errors(ctx):
    world = comm.group_timeout(dist.group.WORLD)
    assert world == HARNESS_TIMEOUT
    for sp in (1, 2):  # sp=1: new size-1 sp groups; sp=2: new size-1 dp groups (the other is the world)
        topo = ulysses_sp.init_sp(sp)
        assert comm.group_timeout(topo.sp_group) == comm.group_timeout(topo.dp_group) == world, sp
    assert comm.group_timeout(ulysses_sp.init_sp(2, timeout=timedelta(seconds=7)).dp_group) == timedelta(seconds=7)

    topo = ulysses_sp.init_sp(2)
    model = ulysses_sp.apply(tiny_model("tiny-llama").to(ctx.device), topo)
    s = 8 - topo.sp_rank  # rank 0 holds 8 tokens, rank 1 holds 7: not slices of one padded batch
    ids = tokens(1, s, device=ctx.device)
    with pytest.raises(
        ValueError,
        match=r"local shards of different shapes \(rank 0: \[B=1, s=8\], rank 1: "
        r"\[B=1, s=7\]\).*ulysses_sp.shard_batch.*sp_size=2",
    ):
        model(input_ids=ids)
    ids = tokens(1, 8, device=ctx.device)
    pos = torch.arange(8, device=ctx.device).unsqueeze(0) + 8 * topo.sp_rank - 9  # rank 0 holds -9..-2
    with pytest.raises(ValueError, match=r"position_ids hold negative values \(min -9\)"):
        model(input_ids=ids, position_ids=pos)  # raised on rank 1 too, whose own ids are fine
    with pytest.raises(ValueError, match=r"position_ids must be an integer tensor \(torch.long\), got torch.float32"):
        model(input_ids=ids, position_ids=pos.float())
    with torch.no_grad():  # the model still works afterwards: nothing was left half-done
        assert model(input_ids=ids).logits.shape == (1, 8, 256)
    dist.barrier()


def test_timeouts_and_input_errors_on_every_rank():
    harness.run(_body_groups_and_input_errors, 2)


def _train(argv: list[str]) -> tuple[list[float], dict]:
    """One TrainingRun in this process (the process group exists already): its step losses (rank 0) and
    the data loader's final position."""
    config = parse_config(argv)
    run = TrainingRun.start(make_plan(config))
    try:
        run.train()
    finally:
        run.close()
    assert all(g == timedelta(seconds=config.timeout_s) for g in map(comm.group_timeout, _groups()))
    losses = []
    if dist.get_rank() == 0:
        with open(config.metrics) as f:
            losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    return losses, run.loader.state_dict()


def _groups():
    return list(dist.distributed_c10d._world.pg_map)


def _body_checkpoint_round_trips(ctx, tmp: str, engines):
    data = os.path.join(tmp, "data.txt")  # documents of 25 tokens: rows of 24 and of 1 (no label: skipped)
    ones = os.path.join(tmp, "ones.txt")  # one-token documents: nothing to learn from, refused by the plan
    if ctx.rank == 0:  # one writer, then a barrier: a rank reading a file another rank is writing reads it empty
        config = build_config("tiny-llama-gqa", attention_dropout=0.2)
        config.save_pretrained(os.path.join(tmp, "model"))  # dropout on: the losses depend on the random streams
        with open(data, "w") as f:
            f.write("\n\n".join(f"doc {i:03d} abcdefghijklmnopq" for i in range(40)))
        with open(ones, "w") as f:
            f.write("\n\n".join("x" for _ in range(8)))
    dist.barrier()
    with pytest.raises(ValueError, match=r"ones.txt: every one of its 8 documents is 1 token long; a document needs"):
        _train(
            [
                "--device",
                "cpu",
                "--sp-size",
                "2",
                "--dataset",
                ones,
                "--steps",
                "2",
                "--metrics",
                os.path.join(tmp, "ones.jsonl"),
            ]
        )
    for engine in engines:
        out = os.path.join(tmp, engine)
        common = [
            "--device",
            "cpu",
            "--model",
            os.path.join(tmp, "model"),
            "--sp-size",
            "2",
            "--steps",
            "6",
            "--dataset",
            data,
            "--seq-len",
            "24",
            "--lr",
            "3e-3",
            "--seed",
            "5",
            "--dtype",
            "fp32",
            "--timeout-s",
            "120",
        ]
        if engine != "torch":
            common += ["--deepspeed", os.path.join(ROOT, "configs", "deepspeed", f"{engine}.json")]
        full, end = _train(
            [
                *common,
                "--save-dir",
                os.path.join(out, "ckpt"),
                "--save-every",
                "3",
                "--metrics",
                os.path.join(out, "full.jsonl"),
            ]
        )
        resumed, resumed_end = _train(
            [
                *common,
                "--resume",
                os.path.join(out, "ckpt", "step_00000003"),
                "--metrics",
                os.path.join(out, "resumed.jsonl"),
            ]
        )
        assert resumed_end == end and end["batches_seen"] > 6, (end, resumed_end)  # label-less rows were skipped
        if ctx.rank == 0:
            assert len(full) == 6 and resumed == full[3:], (engine, full, resumed)
        dist.barrier()


@pytest.mark.slow
def test_checkpoint_round_trips_torch_and_zero_stages(tmp_path):
    harness.run(_body_checkpoint_round_trips, 2, str(tmp_path), ["torch", "zero0", "zero1", "zero2", "zero3"])
