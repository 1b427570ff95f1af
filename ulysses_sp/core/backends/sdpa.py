"""sdpa: torch's scaled_dot_product_attention, with a memory-safe route for masked batches on CUDA
(torch's varlen kernel, else flex above ``DENSE_MASK_WARN_TOKENS``) and a dense mask otherwise.

Shape legend: B batch, S full sequence, nq/nk heads on this rank, H head dim (Hv for values).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import dense, flex
from .dense import custom_dense, dense_mask, repeat_kv
from .spec import AttnSpec
from .varlen import varlen_route


def attend(q, k, v, spec: AttnSpec) -> torch.Tensor:
    groups = q.shape[2] // k.shape[2]
    if spec.softcap is not None:
        raise ValueError(
            "sdpa has no logit softcapping; use attn_implementation='eager', 'flex_attention' "
            "or 'flash_attention_2' for this model"
        )
    needs_mask = (
        spec.custom_mask is not None or not spec.info.is_plain or spec.window is not None or spec.chunk is not None
    )
    if needs_mask and spec.custom_mask is None and q.is_cuda and spec.dropout == 0.0:
        varlen = varlen_route(q, k, v, spec)
        if varlen is not None:
            return varlen
        if spec.info.seq_len > dense.DENSE_MASK_WARN_TOKENS:
            return flex.attend(q, k, v, spec)  # no varlen kernel for this call: block-sparse, not S x S
    mask, is_causal = None, spec.causal
    if spec.custom_mask is not None:
        mask, is_causal = custom_dense(spec.custom_mask, q.dtype), False
    elif needs_mask:
        mask, is_causal = dense_mask(spec, q.device), False
    if mask is not None and groups > 1:
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)  # masked GQA falls back to math on CUDA
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),  # [B, n, S, H]
        attn_mask=mask,
        dropout_p=spec.dropout,
        is_causal=is_causal,
        scale=spec.scale,
        enable_gqa=mask is None and groups > 1,
    )  # [B, nq, S, Hv]
    return out.transpose(1, 2)  # [B, S, nq, Hv]
