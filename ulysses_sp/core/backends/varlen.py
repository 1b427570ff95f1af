"""Varlen layout of a packed/padded batch (flash-attn and torch's varlen kernel): cu_seqlens over
the flattened valid tokens, and torch's varlen route for sdpa on CUDA.

Shape legend: B batch, S full sequence, n heads, H head dim, T valid tokens over B*S.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch

from ..sequence_info import SequenceInfo
from .spec import AttnSpec


def varlen_route(q, k, v, spec: AttnSpec) -> torch.Tensor | None:
    """torch's varlen flash kernel for packed/padded/windowed batches on CUDA (no dense mask)."""
    fn = torch_varlen()
    if fn is None or q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] != v.shape[-1]:
        return None
    if spec.chunk is not None or (spec.window is not None and spec.info.gapped):
        return None  # dropping interior padding would shorten the window's distances
    cu, max_len = cu_seqlens(spec.info, q.shape[0], q.device)
    window = (
        -1 if spec.window is None else spec.window - 1,
        0 if spec.causal else (-1 if spec.window is None else spec.window - 1),
    )
    qf, kf, vf = (flatten_valid(t, spec.info) for t in (q, k, v))  # [T, n, H]
    out = fn(
        qf, kf, vf, cu, cu, max_len, max_len, scale=spec.scale, window_size=window, enable_gqa=q.shape[2] != k.shape[2]
    )  # [T, nq, H]
    return unflatten_valid(out, spec.info, q.shape[0])


@lru_cache(maxsize=1)
def torch_varlen():
    """torch's ``varlen_attn`` when it takes a scale, windows and GQA, else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if not {"scale", "window_size", "enable_gqa"} <= set(params):
        return None  # the first API (is_causal only) cannot express windows or GQA
    return varlen_attn


def cu_seqlens(info: SequenceInfo, batch: int, device) -> tuple[torch.Tensor, int]:
    """cu_seqlens over the flattened valid tokens; one document per row when the info is plain."""
    if info.cu_seqlens is not None:
        return info.cu_seqlens.to(device), int(info.max_seqlen)
    key = ("cu", batch, str(device))
    if key not in info.cache:
        info.cache[key] = torch.arange(0, (batch + 1) * info.seq_len, info.seq_len, dtype=torch.int32, device=device)
    return info.cache[key], info.seq_len


def flatten_valid(x: torch.Tensor, info: SequenceInfo) -> torch.Tensor:
    flat = x.reshape(-1, *x.shape[2:])  # [B*S, n, H]
    return flat if info.valid_index is None else flat.index_select(0, info.valid_index.to(x.device))  # [T, n, H]


def unflatten_valid(out: torch.Tensor, info: SequenceInfo, batch: int) -> torch.Tensor:
    if info.valid_index is None:
        return out.view(batch, info.seq_len, *out.shape[1:])  # [B, S, n, H]
    full = out.new_zeros(batch * info.seq_len, *out.shape[1:])  # padding queries read nothing: zeros
    full = full.index_copy(0, info.valid_index.to(out.device), out)  # [B*S, n, H]
    return full.view(batch, info.seq_len, *out.shape[1:])
