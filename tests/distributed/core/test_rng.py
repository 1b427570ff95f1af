"""RNG policy on dp2 x sp2: synced streams equal inside an SP group and distinct across DP groups;
per-rank streams distinct, deterministic, different per step, synced streams intact afterwards;
a tiny model with dropout trains deterministically, its dropout masks differ across SP ranks, and
gradient checkpointing recomputes the same masks."""

from __future__ import annotations

import random
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import ulysses_sp
from tests.distributed import harness
from tests.distributed.loss.test_loss import _full_batch, _local_batch
from tests.helpers import tiny_model
from ulysses_sp.core import comm
from ulysses_sp.core.rng import sharded_rng, sync_rng
from ulysses_sp.loss.causal_lm import causal_lm_loss


def _gather(x: torch.Tensor, group) -> list[torch.Tensor]:
    """One row per rank of ``group`` (rank order)."""
    return list(comm.all_gather(x.reshape(1, -1), group))


def _torch_draws(device) -> torch.Tensor:
    draws = [torch.rand(4, dtype=torch.float64)]
    if device.type == "cuda":
        draws.append(torch.rand(4, dtype=torch.float64, device=device).cpu())
    return torch.cat(draws)


def _all_draws(device) -> torch.Tensor:
    host = torch.tensor([*np.random.rand(3), random.random()], dtype=torch.float64)
    return torch.cat([_torch_draws(device), host])


def _check_streams(ctx, topo):
    world, me, dev = dist.group.WORLD, topo.rank, ctx.device
    same_sp_group = lambda a, b: a // topo.sp_size == b // topo.sp_size  # noqa: E731
    sync_rng(topo, 1234)
    rows = _gather(_all_draws(dev).to(dev), world)
    for r, row in enumerate(rows):
        if same_sp_group(r, me):
            assert torch.equal(row, rows[me]), f"synced draws differ inside the SP group (ranks {r}, {me})"
        else:
            assert not torch.isin(row, rows[me]).any(), f"DP groups share synced draws (ranks {r}, {me})"

    sync_rng(topo, 1234)
    with sharded_rng(topo) as seed:
        first = _torch_draws(dev)
    after_few = _all_draws(dev)
    with sharded_rng(topo):
        second = _torch_draws(dev)
    rows = _gather(first.to(dev), world)
    assert all(not torch.isin(rows[r], rows[me]).any() for r in range(topo.world_size) if r != me), (
        "per-rank streams must differ across ranks"
    )
    assert not torch.isin(second, first).any(), "each entry must give a new per-rank stream"
    rows = _gather(after_few.to(dev), world)
    assert all(torch.equal(rows[r], rows[me]) for r in range(topo.world_size) if same_sp_group(r, me)), (
        "synced streams must stay identical inside the SP group after sharded_rng"
    )

    sync_rng(topo, 1234)
    with sharded_rng(topo) as seed_again:
        again = _torch_draws(dev)
        torch.rand(1000)  # consuming more of the per-rank stream must not move the synced one
    assert seed_again == seed and torch.equal(again, first), "per-rank streams must be deterministic"
    assert torch.equal(_all_draws(dev), after_few), "sharded_rng must restore the synced streams"


class _DropoutMasks(TorchFunctionMode):
    """Records, for each F.dropout call, which elements were kept (zeros of the input count as kept),
    and the fraction of the non-zero inputs that was dropped."""

    def __init__(self):
        super().__init__()
        self.masks: list[torch.Tensor] = []
        self.dropped = self.nonzero = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.dropout:
            self.masks.append((out != 0) | (args[0] == 0))
            self.dropped += int(((out == 0) & (args[0] != 0)).sum())
            self.nonzero += int((args[0] != 0).sum())
        return out


def _train(ctx, topo, sharded=True, checkpointing=False, steps=2):
    """Two SGD steps of a tiny Llama with attention dropout 0.5; losses, masks, final weights."""
    model = tiny_model("tiny-llama", attn="eager", attention_dropout=0.5).to(ctx.device)
    if checkpointing:
        model.gradient_checkpointing_enable()
    ulysses_sp.apply(model, topo)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sync_rng(topo, 7)
    losses, masks, dropped = [], [], []
    for step in range(steps):
        batch = _local_batch(*_full_batch(topo.dp_rank, step, ctx.device), topo)
        with _DropoutMasks() as rec, sharded_rng(topo) if sharded else nullcontext():
            loss = causal_lm_loss(model, batch, topo)
        loss.backward()
        for p in model.parameters():
            p.grad = comm.all_reduce(p.grad, dist.group.WORLD) / topo.world_size
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
        masks.append(torch.cat([m.flatten() for m in rec.masks]))
        dropped.append(rec.dropped / rec.nonzero)
    ulysses_sp.remove(model)
    return torch.stack(losses), masks, dropped, [p.detach() for p in model.parameters()]


def _check_dropout(ctx, topo):
    losses, masks, dropped, weights = _train(ctx, topo)
    again, masks_again, _, _ = _train(ctx, topo)
    assert torch.equal(losses, again), f"dropout training is not deterministic: {losses} vs {again}"
    assert all(torch.equal(a, b) for a, b in zip(masks, masks_again))
    assert all(0.4 < d < 0.6 for d in dropped), f"dropout p=0.5 dropped {dropped} of the probabilities"
    assert not torch.equal(masks[0], masks[1]), "masks must change from step to step"
    peer = _gather(masks[0].to(torch.uint8), topo.sp_group)
    assert not torch.equal(peer[0], peer[1]), "SP ranks drew the same dropout masks for different heads"

    _, plain_masks, _, _ = _train(ctx, topo, sharded=False, steps=1)  # the hazard sharded_rng removes
    peer = _gather(plain_masks[0].to(torch.uint8), topo.sp_group)
    assert torch.equal(peer[0], peer[1]), "without sharded_rng the SP ranks share one stream"

    ckpt_losses, ckpt_masks, _, ckpt_weights = _train(ctx, topo, checkpointing=True)
    assert torch.equal(ckpt_losses, losses) and torch.equal(ckpt_masks[1], masks[1])
    for a, b in zip(ckpt_weights, weights):  # recompute in backward drew the forward's masks
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _body(ctx, sp_size):
    topo = ulysses_sp.init_sp(sp_size)
    _check_streams(ctx, topo)
    _check_dropout(ctx, topo)


def test_rng_streams_and_dropout():
    harness.run(_body, 4, 2)
