"""Hybrid SP (Ulysses x ring attention) against the single-process model on the same batch: the
local logits of every rank (load-balanced layout, through shard_batch) equal the reference's at
the rank's global positions, and every parameter gradient summed over the SP group equals the
reference's. Layouts (u, r): (1, 2) on 2 ranks; (2, 2), (1, 4), (4, 1) and dp2 x (1, 2) on 4.
Cases: GQA; fewer heads than sp (2 heads at sp 4, MQA below u); packed documents (reference: each
document alone); sliding windows shorter and longer than a ring chunk; a length not divisible by
2 * sp with a padding mask; positions and documents gathered by the model's hook; torch.compile
(no graph break, compiled gradients equal eager ones); full and selective activation checkpointing;
MLA (DeepSeek-V3: value head dim != query head dim); flex_attention's block kernel on packed,
windowed and padded batches (on CPU logits only: torch has no CPU flex backward, and training is
refused); flash_attention_2's block kernel on packed, windowed and padded batches, on CPU through a
reference of flash-attn 2's varlen kernels (tests/unit/core/flash_reference.py). fp32, gloo.
"""

from __future__ import annotations

import pytest
import torch

import ulysses_sp
from tests.distributed import harness
from tests.helpers import assert_grads_close, clone, tiny_model, tokens
from tests.unit.core import flash_reference
from ulysses_sp.core import comm, layout
from ulysses_sp.core.sharding import shard_batch
from ulysses_sp.memory.activation_checkpointing import enable_checkpointing

LENS = [[5, 14, 13], [20, 12]]  # documents of the two rows of a 32-token batch
TOL = {"rtol": 1e-4, "atol": 1e-4}  # fp32; references sum tokens in another order (documents alone)

#: (name, preset, model overrides, sequence length, packed document lengths, padding mask)
CASES = [
    ("gqa", "tiny-llama-gqa", {}, 32, None, False),
    ("2 heads", "tiny-qwen3", {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}, 32, None, False),
    ("packed", "tiny-qwen3", {}, 32, LENS, False),
    ("window < chunk", "tiny-mistral", {"sliding_window": 3}, 32, None, False),
    ("window > chunk", "tiny-mistral", {"sliding_window": 11}, 32, None, False),
    ("padding", "tiny-llama-gqa", {}, 27, None, True),
]


def _alone(ref, ids, lens):
    """Logits [B, S, V] of every document of every row run through the model on its own."""
    rows = [torch.cat([ref(input_ids=d[None]).logits[0] for d in row.split(n)]) for row, n in zip(ids, lens)]
    return torch.stack(rows)


def _check(ctx, topo, name, preset, overrides, seq, lens, padded, checkpointing=None, attn="sdpa"):
    flash = attn == "flash_attention_2"  # named on the config only: transformers would look for the package
    model = tiny_model(preset, attn="sdpa" if flash else attn, dtype=ctx.dtype, **overrides).to(ctx.device)
    ref = clone(model)
    ref.set_attn_implementation("sdpa")  # the reference: the single-process sdpa model
    if flash:
        model.config._attn_implementation = attn
    if checkpointing is not None:  # the backward re-runs the layer: the ring's forward, or its saved outputs
        enable_checkpointing(model, checkpointing)
    ids = tokens(2, seq, seed=50 + topo.dp_rank, device=ctx.device)
    weights = torch.randn(2, seq, model.config.vocab_size, generator=torch.Generator().manual_seed(9 + topo.dp_rank))
    weights = weights.to(ctx.device, ctx.dtype)
    batch = {"input_ids": ids}
    mask = None
    if padded:
        mask = torch.ones(2, seq, dtype=torch.long, device=ctx.device)
        mask[0, :3] = 0  # left padding
        mask[1, 9:12] = 0  # interior padding
        batch["attention_mask"] = mask
    if lens is not None:
        batch["seq_lens"] = lens
    want = _alone(ref, ids, lens) if lens is not None else ref(input_ids=ids, attention_mask=mask).logits
    forward_only = attn == "flex_attention" and ctx.device.type == "cpu"  # torch has no CPU flex backward
    keep = torch.ones(2, seq, dtype=torch.bool, device=ctx.device) if mask is None else mask.bool()
    (torch.where(keep[..., None], want.float() * weights, 0)).sum().backward()

    ulysses_sp.apply(model, topo)
    local = shard_batch(batch, topo)
    with torch.set_grad_enabled(not forward_only):
        got = model(**local).logits  # [B, s, V]
    S = layout.padded_length(seq, topo.sp_size, topo.ring_size)
    pos = layout.local_index(S, topo.sp_size, topo.ring_size, topo.sp_rank, ctx.device)  # [s] global positions
    assert torch.equal(local["position_ids"][0], pos) or lens is not None
    real = pos < seq
    idx = pos[real]
    ok = keep[:, idx]  # [B, s_real]
    what = f"{name} at u={topo.ulysses_size} r={topo.ring_size} dp={topo.dp_size} checkpointing={checkpointing} {attn}"
    torch.testing.assert_close(got[:, real][ok], want[:, idx][ok].detach(), **TOL, msg=lambda m: f"{what} logits: {m}")
    if forward_only:
        with pytest.raises(ValueError, match="flex_attention has no backward on CPU"):
            model(**local)  # raised before the call's first collective: no rank hangs
        ulysses_sp.remove(model)
        return
    (torch.where(ok[..., None], got[:, real].float() * weights[:, idx], 0)).sum().backward()
    for p in model.parameters():
        if p.grad is not None:
            p.grad = comm.all_reduce(p.grad, topo.sp_group)
    assert_grads_close(model, ref, **TOL)
    if name == "gqa":  # the hook's path: default positions of the layout, gathered and put back in order
        with torch.no_grad():
            hooked = model(input_ids=local["input_ids"]).logits
        torch.testing.assert_close(hooked, got.detach(), **TOL, msg=lambda m: f"{what} via the hook: {m}")
    ulysses_sp.remove(model)


def _body(ctx, layouts):
    for sp, ring in layouts:
        topo = ulysses_sp.init_sp(sp, ring)
        assert (topo.ulysses_size, topo.ring_size) == (sp // ring, ring)
        assert topo.sp_rank == topo.ring_rank * topo.ulysses_size + topo.ulysses_rank
        assert comm.world_size(topo.ulysses_group) == sp // ring
        if (sp, ring) == (4, 2):  # 2 Ulysses ranks for 1 head: refused at apply, naming the ring that fits
            one_head = tiny_model("tiny-qwen3", num_attention_heads=1, num_key_value_heads=1)
            with pytest.raises(
                ValueError, match="leaves 2 Ulysses ranks, more than num_attention_heads=1.*ring_size=4"
            ):
                ulysses_sp.apply(one_head, topo)
        for case in CASES:
            if ring == 1 and case[0] not in ("gqa", "2 heads", "padding"):
                continue  # Ulysses alone: its masks are test_masks.py's; here its layout path and the refusal
            if (topo.dp_size > 1 or ctx.world_size == 2) and case[0] not in ("gqa", "packed", "padding"):
                continue  # dp x ring, and the 2-rank spawn (which adds checkpointing, MLA, compile): the
                # windows and the 2-head model are the same code as at (1, 4) and (2, 2)
            heads = case[2].get("num_attention_heads", 8)
            if topo.ulysses_size > heads:  # 2 heads on 4 Ulysses ranks: refused, naming the ring that fits
                with pytest.raises(ValueError, match="ring_size=2"):
                    ulysses_sp.apply(tiny_model(case[1], **case[2]), topo)
                continue
            _check(ctx, topo, *case)
    if ctx.world_size == 2:
        for policy in ("full", "selective"):
            _check(ctx, topo, *CASES[3], checkpointing=policy)  # a window shorter than a chunk
        _check(ctx, topo, "MLA", "tiny-deepseek-v3", {}, 32, LENS, False)  # value head dim != query head dim
        for name, preset, overrides, *rest in (CASES[2], CASES[3], CASES[5]):  # packed, window < chunk, padding
            flex = {**overrides, "head_dim": 16}  # flex's CUDA kernel needs head dims >= 16
            _check(ctx, topo, name, preset, flex, *rest, attn="flex_attention")  # CPU: logits only
        if ctx.device.type == "cpu":  # flash's kernels through their CPU reference (fp32): logits and gradients
            with flash_reference.installed():
                for case in (CASES[2], CASES[4], CASES[5]):  # packed, window > chunk, padding (interior: no window)
                    _check(ctx, topo, *case, attn="flash_attention_2")
        _check_compile(ctx)
        _check_refusals(ctx)


def _check_compile(ctx):
    """The ring under torch.compile(fullgraph=True): no graph break (the P2P is functional, the masks
    are made before the autograd.Function), and compiled logits and gradients equal eager ones."""
    topo = ulysses_sp.init_sp(2, 2)
    model = tiny_model("tiny-mistral", dtype=ctx.dtype, num_hidden_layers=1, sliding_window=5).to(ctx.device)
    ref = clone(model)
    for m in (model, ref):
        ulysses_sp.apply(m, topo)
    local = shard_batch({"input_ids": tokens(1, 32, device=ctx.device), "seq_lens": [[9, 23]]}, topo)
    assert torch._dynamo.explain(model)(**local).graph_break_count == 0
    got = torch.compile(model, backend="aot_eager", fullgraph=True)(**local).logits
    want = ref(**local).logits
    torch.testing.assert_close(got, want, **TOL)
    got.sum().backward()
    want.sum().backward()
    assert_grads_close(model, ref, **TOL)


def _check_refusals(ctx):
    with pytest.raises(ValueError, match="not a multiple of ring_size=3"):
        ulysses_sp.init_sp(2, 3)
    topo = ulysses_sp.init_sp(2, 2)
    with pytest.raises(ValueError, match="ring attention .* not 'flash_attention_3'"):
        fa3 = tiny_model("tiny-llama")
        fa3.config._attn_implementation = "flash_attention_3"  # named only: transformers would fetch its kernel
        ulysses_sp.apply(fa3, topo)
    sinks = ulysses_sp.apply(tiny_model("tiny-gpt-oss", attn="eager").to(ctx.device), topo)
    local = shard_batch({"input_ids": tokens(1, 16, device=ctx.device)}, topo)
    with pytest.raises(ValueError, match="does not support attention sinks"):
        sinks(**local)  # raised before the first all-to-all / P2P of the call: no rank hangs
    with pytest.raises(ValueError, match="multiple of 2 \\* sp_size = 4"):
        sinks(input_ids=tokens(1, 3, device=ctx.device))  # 3 tokens per rank: no mirrored chunks


@pytest.mark.parametrize(
    "world,layouts", [(2, [(2, 2)]), (4, [(4, 2), (4, 4), (4, 1), (2, 2)])], ids=["sp2-r2", "sp4-r2-r4-r1+dp2xr2"]
)
def test_ring_parity(world, layouts):
    harness.run(_body, world, layouts)
