"""The pure-torch block kernel of ring attention: one (query block, key block) pair at a time.

Shape legend: B batch, nq/nk query/key-value heads on this rank (GQA: g = nq/nk), Lq/Lk tokens of
the query/key block, H head dim (Hv for values). Blocks are laid out [B, n, L, H]; everything is
computed in fp32.

The forward returns the block's output normalised by the block's own softmax, with its log-sum-exp
(lse), so blocks merge exactly (:func:`merge`). The backward takes the *global* lse and output of
every query (after all blocks are merged), so each pair's gradient is exact on its own:
    p = exp(s - lse);  dv = p^T do;  dp = do v^T;  ds = p * (dp - rowsum(do * out));
    dq = scale * ds k;  dk = scale * ds^T q.
This kernel is the CPU path of the ring and the reference for GPU block kernels. It materialises
[B, nq, Lq, Lk] scores, like eager attention does for the whole sequence.
"""

from __future__ import annotations

import torch

from .. import masks
from ..sequence_info import SequenceInfo


def pair_mask(info: SequenceInfo, causal: bool, window, q_pos: range, k_pos: range, device):
    """(the rule's bool mask [B|1, 1, Lq, Lk] for queries at global positions ``q_pos`` and keys at
    ``k_pos``, whether it allows nothing); the emptiness needs one host sync, skipped while compiling
    (then False: the pair runs fully masked and adds nothing)."""
    mask = masks.block_mask(info, causal, window, q_pos, k_pos, device)
    return mask, not torch.compiler.is_compiling() and not bool(mask.any())


def _scores(q, k, mask, scale):
    """[B, nq, Lq, H], [B, nk, Lk, H] -> [B, nq, Lq, Lk] fp32 scores, -inf where ``mask`` is False."""
    g = q.shape[1] // k.shape[1]
    s = torch.matmul(q.float(), k.float().repeat_interleave(g, dim=1).transpose(2, 3)) * scale  # [B, nq, Lq, Lk]
    return s if mask is None else s.masked_fill(~mask, float("-inf"))


def forward(q, k, v, mask, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One block pair: ``mask`` [B|1, 1, Lq, Lk] bool (True = attend) or None (all pairs allowed).

    Returns out [B, nq, Lq, Hv] fp32 and lse [B, nq, Lq] fp32; a query that reads no key of the
    block gets out 0 and lse -inf (it then weighs nothing in the merge)."""
    g = q.shape[1] // k.shape[1]
    s = _scores(q, k, mask, scale)  # [B, nq, Lq, Lk]
    lse = torch.logsumexp(s, dim=-1)  # [B, nq, Lq]
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))  # masked rows: exp(-inf) = 0
    out = torch.matmul(p, v.float().repeat_interleave(g, dim=1))  # [B, nq, Lq, Hv]
    return out, lse


def merge(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Fold one block's (out, lse) into the running (out, lse) of the same queries, in place, fp32:
    the softmax over the union of keys is the lse-weighted mean of the two partial softmaxes."""
    new = torch.logaddexp(lse, block_lse)  # [B, nq, L]; -inf only where neither read a key
    finite = torch.isfinite(new)
    safe = torch.where(finite, new, 0.0)
    w_old = torch.where(finite, torch.exp(lse - safe), 0.0).unsqueeze(-1)  # [B, nq, L, 1]
    w_new = torch.where(finite, torch.exp(block_lse - safe), 0.0).unsqueeze(-1)
    out.mul_(w_old).add_(block_out * w_new)
    lse.copy_(new)


def backward(q, k, v, mask, scale: float, do, out, lse, delta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block pair given the merged forward's ``lse`` [B, nq, Lq] and
    ``delta = rowsum(do * out)`` [B, nq, Lq] (fp32), ``do`` [B, nq, Lq, Hv] fp32. ``out``, the merged
    output, is what delta was computed from (kernels that take rowsum(do * out) themselves read it).

    Returns dq [B, nq, Lq, H], dk [B, nk, Lk, H], dv [B, nk, Lk, Hv], fp32 (dk/dv summed over the
    query heads that share each kv head)."""
    B, nk, Lk = k.shape[:3]
    g = q.shape[1] // nk
    p = torch.exp(_scores(q, k, mask, scale) - lse.unsqueeze(-1))  # [B, nq, Lq, Lk]
    kf = k.float().repeat_interleave(g, dim=1)  # [B, nq, Lk, H]
    vf = v.float().repeat_interleave(g, dim=1)  # [B, nq, Lk, Hv]
    dv = torch.matmul(p.transpose(2, 3), do)  # [B, nq, Lk, Hv]
    ds = p * (torch.matmul(do, vf.transpose(2, 3)) - delta.unsqueeze(-1))  # [B, nq, Lq, Lk]
    dq = torch.matmul(ds, kf) * scale  # [B, nq, Lq, H]
    dk = torch.matmul(ds.transpose(2, 3), q.float()) * scale  # [B, nq, Lk, H]
    fold = lambda t: t.view(B, nk, g, Lk, t.shape[-1]).sum(2)  # noqa: E731  [B, nq, Lk, *] -> [B, nk, Lk, *]
    return dq, fold(dk), fold(dv)
