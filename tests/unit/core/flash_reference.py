"""A CPU reference of flash-attn 2's two varlen entry points (``_flash_attn_varlen_forward`` /
``_flash_attn_varlen_backward``), for testing the ring's flash block kernel where flash-attn cannot
run: what flash-attn 2 computes for one varlen call, fp64 inside. Per segment (cu_seqlens) the
mask is aligned to the segment's bottom-right corner; window sizes >= max_seqlen_k mean no limit,
causal is a window with right = 0, a one-sided window is limited to max_seqlen_k on the other side
(flash_api.cpp); a row with no key gets lse +inf and output 0; the backward takes the given out and
lse. :func:`installed` swaps it in for block_flash's kernels (and flash's half precision for fp32,
so that results compare at fp32 tolerances), and lets ``apply`` take flash_attention_2 without the
package.

Shape legend: T tokens of a call, nq/nk heads, H head dim; q/k/v [T, n, H], lse [nq, T].
"""

from __future__ import annotations

import contextlib

import torch

from ulysses_sp.core import apply
from ulysses_sp.core.backends import block_flash


def segment_mask(Lq: int, Lk: int, m: int, causal: bool, left: int, right: int) -> torch.Tensor:
    """flash-attn 2's mask [Lq, Lk] of one varlen segment (module docstring)."""
    right = 0 if causal else right
    left, right = (-1 if w >= m else w for w in (left, right))
    if left < 0 and right < 0:
        return torch.ones(Lq, Lk, dtype=torch.bool)
    left, right = (m if w < 0 else w for w in (left, right))
    i, j, d = torch.arange(Lq).view(-1, 1), torch.arange(Lk).view(1, -1), Lk - Lq
    return (j >= i + d - left) & (j <= i + d + right)


def _segments(cu_q, cu_k, m, causal, left, right):
    for a, b, c, d in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()):
        yield slice(a, b), slice(c, d), segment_mask(b - a, d - c, m, causal, left, right)


def _scores(q, k, mask, scale):
    g = q.shape[1] // k.shape[1]
    s = torch.einsum("qhd,khd->hqk", q.double(), k.double().repeat_interleave(g, 1)) * scale  # [nq, Tq, Tk]
    return s.masked_fill(~mask, float("-inf"))


def varlen_forward(q, k, v, cu_q, cu_k, mq, mk, dropout, scale, causal, left, right):
    assert dropout == 0.0 and mq == mk
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float64)  # [T, nq, H]
    lse = torch.full((q.shape[1], q.shape[0]), float("inf"), dtype=torch.float64)  # [nq, T]
    g = q.shape[1] // k.shape[1]
    for qs, ks, mask in _segments(cu_q, cu_k, mk, causal, left, right):
        s = _scores(q[qs], k[ks], mask, scale)
        m = torch.logsumexp(s, -1)  # [nq, Lq]
        reads = torch.isfinite(m)
        lse[:, qs] = torch.where(reads, m, float("inf"))
        p = torch.where(reads.unsqueeze(-1), torch.exp(s - torch.where(reads, m, 0.0).unsqueeze(-1)), 0.0)
        out[qs] = torch.einsum("hqk,khd->qhd", p, v[ks].double().repeat_interleave(g, 1))
    return out.to(q.dtype), lse.float(), None, None


def varlen_backward(
    dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, mq, mk, dropout, scale, causal, left, right, softcap, *_
):
    assert dropout == 0.0 and softcap == 0.0 and mq == mk
    g = q.shape[1] // k.shape[1]
    dq.zero_(), dk.zero_(), dv.zero_()
    delta = (dout.double() * out.double()).sum(-1).T  # [nq, T]
    for qs, ks, mask in _segments(cu_q, cu_k, mk, causal, left, right):
        p = torch.exp(_scores(q[qs], k[ks], mask, scale) - lse[:, qs].double().unsqueeze(-1))  # [nq, Lq, Lk]
        do, vk = dout[qs].double(), v[ks].double().repeat_interleave(g, 1)
        ds = p * (torch.einsum("qhd,khd->hqk", do, vk) - delta[:, qs].unsqueeze(-1))
        dq[qs] = (torch.einsum("hqk,khd->qhd", ds, k[ks].double().repeat_interleave(g, 1)) * scale).to(dq.dtype)
        fold = lambda t: t.view(t.shape[0], -1, g, t.shape[-1]).sum(2)  # noqa: E731  [Lk, nq, H] -> [Lk, nk, H]
        dk[ks] = fold(torch.einsum("hqk,qhd->khd", ds, q[qs].double()) * scale).to(dk.dtype)
        dv[ks] = fold(torch.einsum("hqk,qhd->khd", p, do)).to(dv.dtype)


@contextlib.contextmanager
def installed():
    """block_flash runs on this reference, in fp32; apply accepts flash_attention_2."""
    saved = block_flash.flash_ops, block_flash._precision, apply.check_installed
    block_flash.flash_ops = lambda: (varlen_forward, varlen_backward)
    block_flash._precision = lambda q: (torch.float32, -(-q.shape[-1] // 8) * 8)
    apply.check_installed = lambda impl: None
    try:
        yield
    finally:
        block_flash.flash_ops, block_flash._precision, apply.check_installed = saved
