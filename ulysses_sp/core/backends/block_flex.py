"""The ring's block kernel on flex_attention: one (query block, key block) pair, the pair's mask as a
block-sparse BlockMask of the one rule (masks.py) at the blocks' global positions.

Shape legend: B batch, nq/nk query/key-value heads (GQA: g = nq/nk), Lq/Lk tokens of the query/key
block, H head dim (Hv for values). Blocks are [B, n, L, H]; out and lse come back in fp32, like
block.py's (the reference).

Forward: flex with its log-sum-exp (the block's own softmax). Backward: flex has no entry that
takes the *merged* output and lse, but its autograd differentiates its lse too, so the pair's
gradient w.r.t. the global softmax is taken through the merge. With the merged
``out = sum_b w_b o_b``, ``w_b = exp(lse_b - lse)`` and ``lse = logsumexp_b lse_b``:
    d o_b = w_b do;   d lse_b = w_b (rowsum(do * o_b) - rowsum(do * out)) = w_b (rowsum(do * o_b) - delta)
and flex's backward of (o_b, lse_b) with these gives ``ds = p_b w_b (dp - delta) = p (dp - delta)``,
block.py's formula. It recomputes the pair's forward in the backward (flex keeps nothing between
calls), so a pair costs two flex forwards and one flex backward. torch has no flex backward on CPU:
there the ring runs flex forward-only (``ring.check_supported`` refuses training); the formula is tested on CPU through
:func:`backward_through_merge` with the torch kernel's forward, flex's own on a GPU.
"""

from __future__ import annotations

import torch

from .. import masks
from ..sequence_info import SequenceInfo
from . import flex


def pair_mask(info: SequenceInfo, causal: bool, window, q_pos: range, k_pos: range, device):
    """(BlockMask of the rule for queries at global positions ``q_pos`` and keys at ``k_pos``, whether
    it allows nothing); the emptiness needs one host sync, skipped while compiling (then False)."""
    device = torch.device(device)
    rule = masks.mask_mod(info, causal, window)
    # the offsets as tensors: compiled flex and create_block_mask guard on a mask_mod's python ints,
    # and would compile again for every pair
    q0, k0 = (torch.tensor(p.start, device=device) for p in (q_pos, k_pos))

    def shifted(b, h, q, k):  # block-local (q, k) -> the rule at global positions
        return rule(b, h, q + q0, k + k0)

    block_mask = flex.block_mask(shifted, info.rows, None, len(q_pos), len(k_pos), device)
    if torch.compiler.is_compiling():
        return block_mask, False
    full = block_mask.full_kv_num_blocks
    allowed = int(block_mask.kv_num_blocks.sum()) + (0 if full is None else int(full.sum()))
    return block_mask, allowed == 0


def _flex(q, k, v, block_mask, scale: float):
    """flex with its lse: out [B, nq, Lq, Hv] (input dtype), lse [B, nq, Lq] fp32 (-inf where a
    query reads no key of the block; flex's out is 0 there)."""
    fn = flex.flex_function(q.device)
    out, aux = fn(
        q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1], **flex.flex_lse_kwargs()
    )
    return out, getattr(aux, "lse", aux).float()


def forward(q, k, v, mask, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """As block.forward; ``mask`` a BlockMask from :func:`pair_mask` or None (all pairs allowed)."""
    out, lse = _flex(q.detach(), k.detach(), v.detach(), mask, scale)  # detached: no autograd graph (CPU
    # flex refuses inputs that require grad even with grad mode off)
    return out.float(), lse


def backward(q, k, v, mask, scale: float, do, out, lse, delta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As block.backward (``out`` unused: delta carries it): fp32 dq, dk, dv (kv heads as k's)."""
    return backward_through_merge(lambda *qkv: _flex(*qkv, mask, scale), q, k, v, do, lse, delta)


def backward_through_merge(block_forward, q, k, v, do, lse, delta):
    """Gradients of one pair w.r.t. the global softmax from a differentiable ``block_forward(q, k, v)
    -> (o_b [B, nq, Lq, Hv], lse_b [B, nq, Lq])`` of the pair alone, given the merged ``lse`` and
    ``delta = rowsum(do * out)`` [B, nq, Lq] and ``do`` [B, nq, Lq, Hv] fp32 (formula: module docstring)."""
    with torch.enable_grad():
        qkv = [t.detach().requires_grad_() for t in (q, k, v)]
        o_b, lse_b = block_forward(*qkv)
        reads = torch.isfinite(lse_b)  # [B, nq, Lq]; a query that reads no key of the pair weighs 0
        w = torch.where(reads, torch.exp(torch.where(reads, lse_b, 0.0).detach() - lse), 0.0)  # [B, nq, Lq]
        d_out = (do * w.unsqueeze(-1)).to(o_b.dtype)  # [B, nq, Lq, Hv]
        d_lse = w * ((do * o_b.detach().float()).sum(-1) - delta)  # [B, nq, Lq]
        grads = torch.autograd.grad((o_b, lse_b), qkv, (d_out, d_lse.to(lse_b.dtype)))
    return tuple(g.float() for g in grads)
