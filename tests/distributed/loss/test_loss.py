"""Sharded loss against the non-SP reference: one process running every micro-batch of every DP
replica through transformers' own loss (sum / N of the whole step). Checked per rank: each loss
value, the step's token count, the logged loss, and every parameter gradient after the engine's
reduction (average over the world, as DDP / DeepSpeed do). Sequence length 23 (not divisible by P),
prompt-masked rows, fully ignored rows and shards without any labelled token."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import ulysses_sp
from tests.distributed import harness
from tests.helpers import assert_grads_close, clone, tiny_model, tokens, tolerances
from ulysses_sp.core import comm
from ulysses_sp.loss.causal_lm import CausalLMLoss, causal_lm_loss, count_label_tokens, reduce_loss_for_logging
from ulysses_sp.loss.logits import logit_transform
from ulysses_sp.loss.tiled_ce import liger_unsupported_reason

PRESETS = (("tiny-llama", 5), ("tiny-qwen2", None))  # (preset, tile_tokens; None = by memory budget)
BATCH, SEQ, MICRO = 2, 23, 2


def _full_batch(dp: int, mb: int, device):
    """Micro-batch ``mb`` of DP replica ``dp``: ids [B, SEQ], labels [B, SEQ] (unshifted)."""
    ids = tokens(BATCH, SEQ, seed=1000 + 10 * dp + mb, device=device)
    labels = ids.clone()
    kind = (dp + mb) % 3
    if kind == 0:
        labels[0, : SEQ * 3 // 4] = -100  # long prompt: the first shards of row 0 have no label
    elif kind == 1:
        labels[1] = -100  # a row without any label
        labels[0, 3:9] = -100
    else:
        labels[:, :19] = -100  # only the last tokens are labelled: most ranks have none at all
    return ids, labels


def _local_batch(ids, labels, topo):
    """Pad to a multiple of P (labels -100), shift on the full sequence, keep this rank's slice."""
    P, B = topo.sp_size, ids.shape[0]
    S = -(-ids.shape[1] // P) * P
    ids = F.pad(ids, (0, S - ids.shape[1]))
    labels = F.pad(labels, (0, S - labels.shape[1]), value=-100)
    shift = torch.full_like(labels, -100)
    shift[:, :-1] = labels[:, 1:]
    pos = torch.arange(S, device=ids.device).expand(B, -1)
    s = S // P
    sl = slice(topo.sp_rank * s, (topo.sp_rank + 1) * s)
    return dict(input_ids=ids[:, sl], position_ids=pos[:, sl], shift_labels=shift[:, sl])


def _check_step(ctx, topo, preset, tile, ddp=False):
    """One optimiser step's worth of micro-batches; the engine is DDP over the world (``ddp``, with the
    tiled MLP on: DDP takes one gradient per parameter and backward) or its reduction done by hand
    (sum all-reduce over the world / world size)."""
    tol = tolerances(ctx.dtype)
    model = tiny_model(preset, dtype=ctx.dtype).to(ctx.device)
    ref = clone(model)
    step = {(d, m): _full_batch(d, m, ctx.device) for d in range(topo.dp_size) for m in range(MICRO)}
    n_global = sum(int((labels[:, 1:] != -100).sum()) for _, labels in step.values())

    ref_losses = {}  # transformers' own loss: sum over the micro-batch / N of the whole step
    for key, (ids, labels) in step.items():
        ref_losses[key] = ref(input_ids=ids, labels=labels, num_items_in_batch=n_global).loss
    sum(ref_losses.values()).backward()

    ulysses_sp.apply(model, topo)
    if ddp:
        ulysses_sp.tile_mlp(model, tile_tokens=3)
    engine = DistributedDataParallel(CausalLMLoss(model, topo, tile_tokens=tile)) if ddp else None
    mine = [_local_batch(*step[(topo.dp_rank, m)], topo) for m in range(MICRO)]
    n = count_label_tokens(mine, topo)
    assert n.item() == n_global / topo.dp_size, (n.item(), n_global, topo.dp_size)
    losses = []
    for m, batch in enumerate(mine):
        if engine is None:
            loss = causal_lm_loss(model, batch, topo, n, tile_tokens=tile)
            loss.backward()
        else:
            with engine.no_sync() if m < MICRO - 1 else nullcontext():  # reduce once, at the last
                loss = engine(batch, n)
                loss.backward()
        losses.append(loss)
        want = ref_losses[(topo.dp_rank, m)].detach() * topo.dp_size  # sum / (N / dp)
        torch.testing.assert_close(loss.detach(), want, **tol, msg=lambda e: f"{preset} mb{m} loss: {e}")
        with torch.no_grad():  # default normalisation: this micro-batch's own labelled tokens
            own = causal_lm_loss(model, batch, topo, tile_tokens=tile)
            ids, labels = step[(topo.dp_rank, m)]
            torch.testing.assert_close(own, ref(input_ids=ids, labels=labels).loss, **tol)
    logged = reduce_loss_for_logging(losses, topo)
    torch.testing.assert_close(logged, sum(ref_losses.values()).detach(), **tol)

    if engine is None:  # what DDP / DeepSpeed do: average every gradient over all world ranks
        for p in model.parameters():
            p.grad = comm.all_reduce(p.grad, dist.group.WORLD) / topo.world_size
    assert_grads_close(model, ref, **tol)
    if ddp:
        ulysses_sp.untile_mlp(model)
    ulysses_sp.remove(model)


def _check_edge_cases(ctx, topo):
    model = ulysses_sp.apply(tiny_model("tiny-llama").to(ctx.device), topo)
    ids, labels = _full_batch(0, 0, ctx.device)
    batch = _local_batch(ids, labels, topo)

    ignored = dict(batch, shift_labels=torch.full_like(batch["shift_labels"], -100))
    loss = causal_lm_loss(model, ignored, topo)
    assert loss.item() == 0.0, "a micro-batch without labels gives 0, not NaN"
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)

    unshifted = {k: v for k, v in batch.items() if k != "shift_labels"}
    with pytest.raises(ValueError, match="shifted on the full sequence"):
        causal_lm_loss(model, dict(unshifted, labels=batch["shift_labels"]), topo)
    with pytest.raises(ValueError, match="no `shift_labels`"):
        causal_lm_loss(model, unshifted, topo)
    with pytest.raises(ValueError, match="shape"):
        causal_lm_loss(model, dict(batch, shift_labels=batch["shift_labels"][:, 1:]), topo)
    for bad in (0, -3.0, torch.tensor(0)):
        with pytest.raises(ValueError, match="> 0"):
            causal_lm_loss(model, batch, topo, bad)
    with pytest.raises(ValueError, match="bfloat16 tensor .*cannot hold a token count"):
        causal_lm_loss(model, batch, topo, torch.tensor(8188.0).to(torch.bfloat16))
    reason = liger_unsupported_reason(
        torch.empty(0, device=ctx.device), model.get_output_embeddings(), logit_transform(model)
    )
    if reason is None:  # CUDA with liger-kernel: the fused loss equals the tiled one
        fused = causal_lm_loss(model, batch, topo, use_liger=True)
        torch.testing.assert_close(fused, causal_lm_loss(model, batch, topo, use_liger=False), rtol=1e-5, atol=1e-6)
    else:
        with pytest.raises(ValueError, match="use_liger=True"):
            causal_lm_loss(model, batch, topo, use_liger=True)
    ulysses_sp.remove(model)
    with pytest.raises(ValueError, match="apply"):
        causal_lm_loss(model, batch, topo)


def _body(ctx, sp_sizes):
    for sp_size in sp_sizes:  # several topologies per spawn: a spawn costs more than the checks
        topo = ulysses_sp.init_sp(sp_size)
        for preset, tile in PRESETS:
            _check_step(ctx, topo, preset, tile)
        if topo.dp_size > 1:
            _check_step(ctx, topo, PRESETS[0][0], PRESETS[0][1], ddp=True)
        if topo.sp_size == topo.world_size == 2:
            _check_edge_cases(ctx, topo)


@pytest.mark.parametrize("world,sp_sizes", [(2, (2,)), (4, (4, 2))], ids=["sp2", "sp4+dp2xsp2"])
def test_loss_and_reduced_grads_match_reference(world, sp_sizes):
    harness.run(_body, world, sp_sizes)
