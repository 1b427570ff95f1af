"""The ring's block kernel on CUDA: torch's memory-efficient attention, which returns its log-sum-exp
and whose backward takes the merged output and lse (nothing [Lq, Lk] is kept; the mask goes in as
an additive bias). Same contract as block.py, which stays the reference (tests/gpu: ring.sh).

Shape legend: B batch, nq/nk heads (GQA: g = nq/nk), Lq/Lk block lengths, H head dim (Hv values).
Blocks are [B, n, L, H]; out and lse come back in fp32 like block.py's.

Why the private aten ops: the public ``scaled_dot_product_attention`` returns no lse, and its
backward recomputes the softmax from the block alone; a ring needs the block's lse to merge and
the *global* lse in the backward. The kernel pads its lse to a multiple of 32 rows
(``kAlignLSE``) and reads a bias whose rows are 16-element aligned; both are honoured here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_LSE_ALIGN = 32
_BIAS_ALIGN = 16


def supports(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel runs these blocks: CUDA, fp32/bf16/fp16, equal q/v head dims."""
    return q.is_cuda and q.dtype in (torch.float32, torch.bfloat16, torch.float16) and q.shape[-1] == v.shape[-1]


def _bias(mask, B: int, n: int, Lq: int, Lk: int, dtype) -> torch.Tensor | None:
    """bool [B|1, 1, Lq, Lk] -> additive [B, n, Lq, Lk] (0 / -inf) view of a 16-aligned buffer."""
    if mask is None:
        return None
    pad = -Lk % _BIAS_ALIGN
    bias = torch.zeros(mask.shape[0], 1, Lq, Lk + pad, dtype=dtype, device=mask.device)
    bias[..., :Lk].masked_fill_(~mask, float("-inf"))
    return bias[..., :Lk].expand(B, n, Lq, Lk)


def _expand_kv(k, v, g: int):
    return k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # [B, nq, Lk, H]


def forward(q, k, v, mask, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """As block.forward: out [B, nq, Lq, Hv] fp32, lse [B, nq, Lq] fp32 (-inf, out 0 where a query
    reads no key of the block)."""
    B, nq, Lq, _ = q.shape
    kr, vr = _expand_kv(k, v, nq // k.shape[1])
    bias = _bias(mask, B, nq, Lq, k.shape[2], q.dtype)
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, kr, vr, bias, True, 0.0, False, scale=scale)[
        :2
    ]
    out, lse = out.float(), lse[..., :Lq].float()  # [B, nq, Lq, Hv], [B, nq, Lq]
    if mask is not None:
        reads = mask.any(-1)  # [B|1, 1, Lq]: rows with a key in this block
        lse = torch.where(reads, lse, float("-inf"))
        out = torch.where(reads.unsqueeze(-1), out, 0.0)
    return out, lse


def backward(q, k, v, mask, scale: float, do, out, lse, delta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As block.backward; the kernel takes rowsum(do * out) from ``out`` itself (``delta`` is the
    torch kernel's). Returns fp32 dq, dk, dv (kv heads folded)."""
    B, nq, Lq, _ = q.shape
    nk, Lk = k.shape[1], k.shape[2]
    g = nq // nk
    kr, vr = _expand_kv(k, v, g)
    bias = _bias(mask, B, nq, Lq, Lk, q.dtype)
    lse = F.pad(lse.contiguous(), (0, -Lq % _LSE_ALIGN))  # [B, nq, Lq rounded up to 32]
    seed = torch.zeros((), dtype=torch.int64, device=q.device)  # no dropout: the kernel reads no RNG state
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        do.to(q.dtype).contiguous(),
        q,
        kr,
        vr,
        bias,
        out.to(q.dtype).contiguous(),
        lse,
        seed,
        seed,
        0.0,
        [True, True, True, False],
        False,
        scale=scale,
    )
    fold = lambda t: t.float().view(B, nk, g, Lk, t.shape[-1]).sum(2)  # noqa: E731  [B, nq, Lk, *] -> [B, nk, Lk, *]
    return dq.float(), fold(dk), fold(dv)
