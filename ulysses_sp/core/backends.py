"""Core attention kernels over the full sequence, run between the two all-to-alls.

Shape legend: B batch, S full sequence, n heads on this rank (nq query, nk key/value), H head dim
(Hv for values), T valid tokens over B*S. Inputs and outputs are [B, S, n, H] ("BSNH").

Each backend honours the same rule (masks.py): causal, sliding window, packed documents and
padding, plus a user's full [B, 1|N, S, S] mask where the kernel can take one (flash cannot: it
refuses). Nothing S x S is built on the flash/flex paths. sdpa with a mask on CUDA takes torch's
varlen kernel where it applies (half precision, equal q/v head dims), else flex above
``DENSE_MASK_WARN_TOKENS``; it builds a dense [B, 1, S, S] mask only on CPU, with dropout, for a
user's custom mask, or at short lengths, and warns when that mask is above that size.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from . import masks
from .sequence_info import SequenceInfo

logger = logging.getLogger("ulysses_sp")

SUPPORTED = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention", "eager")
#: above this many tokens sdpa avoids a dense S x S mask (flex on CUDA) or warns that it builds one
DENSE_MASK_WARN_TOKENS = 16384
#: backends that apply attention sinks: eager as one more logit, flex by renormalising with its lse
SINK_BACKENDS = ("eager", "flex_attention")


@dataclass
class AttnSpec:
    """What one attention call must compute, beyond q/k/v."""

    causal: bool
    scale: float
    dropout: float
    window: int | None  # attend the last `window` keys (transformers' sliding_window), None: all
    softcap: float | None
    info: SequenceInfo
    custom_mask: torch.Tensor | object | None  # a user's full-sequence mask (dense or BlockMask)
    sinks: torch.Tensor | None = None  # [nq] learnable sink logit per head (s_aux, GPT-OSS): one more softmax term


def run(impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttnSpec) -> torch.Tensor:
    """[B, S, nq, H], [B, S, nk, H], [B, S, nk, Hv] -> [B, S, nq, Hv]."""
    if spec.window is not None and spec.window >= spec.info.seq_len:
        spec.window = None  # a window longer than the sequence is full attention
    if spec.sinks is not None and impl not in SINK_BACKENDS:
        raise ValueError(
            f"this model has attention sinks (s_aux, e.g. GPT-OSS), which ulysses_sp applies on "
            f"{' and '.join(SINK_BACKENDS)} only, not on {impl}; load the model with attn_implementation='eager' "
            "or 'flex_attention'"
        )
    if impl == "sdpa":
        return _sdpa(q, k, v, spec)
    if impl in ("flash_attention_2", "flash_attention_3"):
        return _flash(q, k, v, spec, version=3 if impl.endswith("3") else 2)
    if impl == "flex_attention":
        return _flex(q, k, v, spec)
    if impl == "eager":
        return _eager(q, k, v, spec)
    raise AssertionError(f"unsupported backend {impl!r} passed validation")


# --- sdpa --------------------------------------------------------------------------------------


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, S, nk, H] -> [B, S, nk*groups, H] (each kv head next to the q heads that read it)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


def _custom_dense(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise ValueError(
            f"a {type(mask).__name__} attention mask works only with attn_implementation='flex_attention'"
        )
    return mask if mask.dtype == torch.bool else mask.to(dtype)


def _sdpa(q, k, v, spec: AttnSpec) -> torch.Tensor:
    groups = q.shape[2] // k.shape[2]
    if spec.softcap is not None:
        raise ValueError("sdpa has no logit softcapping; use attn_implementation='eager', 'flex_attention' "
                         "or 'flash_attention_2' for this model")
    needs_mask = spec.custom_mask is not None or not spec.info.is_plain or spec.window is not None
    if needs_mask and spec.custom_mask is None and q.is_cuda and spec.dropout == 0.0:
        varlen = _varlen_route(q, k, v, spec)
        if varlen is not None:
            return varlen
        if spec.info.seq_len > DENSE_MASK_WARN_TOKENS:
            return _flex(q, k, v, spec)  # no varlen kernel for this call: block-sparse, not S x S
    mask, is_causal = None, spec.causal
    if spec.custom_mask is not None:
        mask, is_causal = _custom_dense(spec.custom_mask, q.dtype), False
    elif needs_mask:
        mask, is_causal = _dense(spec, q.device), False
    if mask is not None and groups > 1:
        k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)  # masked GQA falls back to math on CUDA
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # [B, n, S, H]
        attn_mask=mask, dropout_p=spec.dropout, is_causal=is_causal, scale=spec.scale,
        enable_gqa=mask is None and groups > 1,
    )  # [B, nq, S, Hv]
    return out.transpose(1, 2)  # [B, S, nq, Hv]


def _dense(spec: AttnSpec, device) -> torch.Tensor:
    S = spec.info.seq_len
    if S > DENSE_MASK_WARN_TOKENS:
        warnings.warn(
            f"ulysses_sp: building a dense {S}x{S} attention mask (packed/padded/windowed batch on a "
            "backend without a sparse route); use flash_attention_2 or flex_attention on GPU to avoid it",
            stacklevel=3,
        )
    key = ("dense", spec.causal, spec.window, str(device))
    if key not in spec.info.cache:
        spec.info.cache[key] = masks.dense_mask(spec.info, spec.causal, spec.window, device)
    return spec.info.cache[key]


def _varlen_route(q, k, v, spec: AttnSpec) -> torch.Tensor | None:
    """torch's varlen flash kernel for packed/padded/windowed batches on CUDA (no dense mask)."""
    fn = _torch_varlen()
    if fn is None or q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] != v.shape[-1]:
        return None
    if spec.window is not None and spec.info.gapped:
        return None  # dropping interior padding would shorten the window's distances
    cu, max_len = _cu_seqlens(spec.info, q.shape[0], q.device)
    window = (-1 if spec.window is None else spec.window - 1, 0 if spec.causal else
              (-1 if spec.window is None else spec.window - 1))
    qf, kf, vf = (_flatten_valid(t, spec.info) for t in (q, k, v))  # [T, n, H]
    out = fn(qf, kf, vf, cu, cu, max_len, max_len, scale=spec.scale, window_size=window,
             enable_gqa=q.shape[2] != k.shape[2])  # [T, nq, H]
    return _unflatten_valid(out, spec.info, q.shape[0])


@lru_cache(maxsize=1)
def _torch_varlen():
    """torch's ``varlen_attn`` when it takes a scale, windows and GQA, else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if not {"scale", "window_size", "enable_gqa"} <= set(params):
        return None  # the first API (is_causal only) cannot express windows or GQA
    return varlen_attn


# --- varlen helpers (flash-attn and torch varlen) -----------------------------------------------


def _cu_seqlens(info: SequenceInfo, batch: int, device) -> tuple[torch.Tensor, int]:
    """cu_seqlens over the flattened valid tokens; one document per row when the info is plain."""
    if info.cu_seqlens is not None:
        return info.cu_seqlens.to(device), int(info.max_seqlen)
    key = ("cu", batch, str(device))
    if key not in info.cache:
        info.cache[key] = torch.arange(0, (batch + 1) * info.seq_len, info.seq_len, dtype=torch.int32, device=device)
    return info.cache[key], info.seq_len


def _flatten_valid(x: torch.Tensor, info: SequenceInfo) -> torch.Tensor:
    flat = x.reshape(-1, *x.shape[2:])  # [B*S, n, H]
    return flat if info.valid_index is None else flat.index_select(0, info.valid_index.to(x.device))  # [T, n, H]


def _unflatten_valid(out: torch.Tensor, info: SequenceInfo, batch: int) -> torch.Tensor:
    if info.valid_index is None:
        return out.view(batch, info.seq_len, *out.shape[1:])  # [B, S, n, H]
    full = out.new_zeros(batch * info.seq_len, *out.shape[1:])  # padding queries read nothing: zeros
    full = full.index_copy(0, info.valid_index.to(out.device), out)  # [B*S, n, H]
    return full.view(batch, info.seq_len, *out.shape[1:])


# --- flash-attn 2 / 3 ---------------------------------------------------------------------------


@lru_cache(maxsize=2)
def flash_functions(version: int):
    """(flash_attn_func, flash_attn_varlen_func) of flash-attn 2 or 3; ImportError when absent."""
    if version == 3:
        from flash_attn_interface import flash_attn_func, flash_attn_varlen_func
    else:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    return flash_attn_func, flash_attn_varlen_func


def _flash(q, k, v, spec: AttnSpec, version: int) -> torch.Tensor:
    if spec.custom_mask is not None:
        raise ValueError(
            "flash-attention cannot take a dense [B, 1, S, S] attention mask; pass packed documents as "
            "position_ids/cu_seqlens, or use attn_implementation='sdpa' or 'eager' for custom masks"
        )
    if spec.window is not None and spec.info.gapped:
        raise ValueError(
            f"flash-attention cannot apply the sliding window ({spec.window} tokens) across padding inside a "
            "sequence: its varlen kernel drops the padding tokens, which shortens the distances the window is "
            "measured on. Put the padding at the ends of each sequence (or document), or use "
            "attn_implementation='sdpa' or 'flex_attention'"
        )
    if version == 3 and spec.dropout > 0:
        raise ValueError("flash_attention_3 has no attention dropout; set attention_dropout=0")
    func, varlen_func = flash_functions(version)
    in_dtype, hv = q.dtype, v.shape[-1]
    if in_dtype not in (torch.float16, torch.bfloat16):
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))  # flash kernels are half precision only
    if hv != q.shape[-1]:
        v = F.pad(v, [0, q.shape[-1] - hv])  # MLA: value head dim < query head dim
    left = -1 if spec.window is None else spec.window - 1
    kwargs = dict(softmax_scale=spec.scale, causal=spec.causal, window_size=(left, 0 if spec.causal else left))
    if spec.softcap is not None:
        kwargs["softcap"] = spec.softcap
    if version == 2:
        kwargs["dropout_p"] = spec.dropout
    if spec.info.is_plain:
        out = _kernel_output(func(q, k, v, **kwargs))  # [B, S, nq, H]
    else:
        cu, max_len = _cu_seqlens(spec.info, q.shape[0], q.device)
        qf, kf, vf = (_flatten_valid(t, spec.info) for t in (q, k, v))  # [T, n, H]
        out = _kernel_output(varlen_func(qf, kf, vf, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len,
                                         max_seqlen_k=max_len, **kwargs))  # [T, nq, H]
        out = _unflatten_valid(out, spec.info, q.shape[0])  # [B, S, nq, H]
    return out[..., :hv].to(in_dtype)


def _kernel_output(out):
    """flash-attn 3 returns (out, softmax_lse) in some releases, flash-attn 2 the output alone."""
    return out[0] if isinstance(out, tuple) else out


# --- flex ---------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@lru_cache(maxsize=1)
def _compiled_create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask)


def _block_mask(mask_mod, batch: int | None, heads: int | None, S: int, device: torch.device):
    """A BlockMask of ``mask_mod`` over [batch|1, heads|1, S, S]. Eager ``create_block_mask``
    evaluates every (q, k) pair into one [batch, heads, S, S] tensor, so on CUDA it runs compiled
    (torch's advice), fusing that evaluation into the per-block reduction; inside a compiled model it
    is traced like any other op."""
    from torch.nn.attention.flex_attention import create_block_mask

    eager = device.type == "cpu" or torch.compiler.is_compiling()
    build = create_block_mask if eager else _compiled_create_block_mask()
    return build(mask_mod, batch, heads, S, S, device=device)


def _flex_custom(mask, B: int, n: int, S: int, device):
    """A user's full-sequence mask for flex -> (BlockMask or None, additive bias [B, n, S, S] or None).

    A BlockMask is used as it is; a bool [B|1, n|1, S, S] mask (True = attend) becomes a BlockMask
    of its True entries; a float one is added to the scores (transformers' additive convention).
    """
    from torch.nn.attention.flex_attention import BlockMask

    if isinstance(mask, BlockMask):
        return mask, None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"a {type(mask).__name__} attention mask is neither a tensor nor a flex BlockMask")
    if mask.dtype == torch.bool:
        allowed = mask.to(device).expand(B, n, S, S)  # a view: flex reads it at every (b, h) it computes

        def keep(b, h, q, k):
            return allowed[b, h, q, k]

        return _block_mask(keep, mask.shape[0], mask.shape[1], S, device), None
    return None, mask.to(device).expand(B, n, S, S)  # [B, n, S, S] view, nothing copied


def _flex(q, k, v, spec: AttnSpec) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    if spec.dropout > 0:
        raise ValueError("flex_attention has no attention dropout; set attention_dropout=0 or use sdpa")
    if q.is_cuda and min(q.shape[-1], v.shape[-1]) < 16:
        raise ValueError(f"flex_attention's compiled CUDA kernel needs head dims >= 16; this model's are "
                         f"{q.shape[-1]} (q/k) and {v.shape[-1]} (v). Use attn_implementation='sdpa' or 'eager'")
    B, S, n = q.shape[:3]
    bias = None
    if spec.custom_mask is not None:
        block_mask, bias = _flex_custom(spec.custom_mask, B, n, S, q.device)
    else:
        key = ("flex", spec.causal, spec.window, str(q.device))
        if key not in spec.info.cache:
            batch = None if spec.info.is_plain else B
            spec.info.cache[key] = _block_mask(masks.mask_mod(spec.info, spec.causal, spec.window), batch, None, S,
                                               q.device)
        block_mask = spec.info.cache[key]
    score_mod = None
    if spec.softcap is not None or bias is not None:
        cap = spec.softcap

        def score_mod(score, b, h, qi, ki):
            if cap is not None:
                score = torch.tanh(score / cap) * cap
            return score if bias is None else score + bias[b, h, qi, ki]

    fn = flex_attention if (q.device.type == "cpu" or torch.compiler.is_compiling()) else _compiled_flex()
    out = fn(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # [B, n, S, H]
        score_mod=score_mod, block_mask=block_mask, scale=spec.scale, enable_gqa=q.shape[2] != k.shape[2],
        **(_flex_lse_kwargs() if spec.sinks is not None else {}),
    )  # [B, nq, S, Hv]
    if spec.sinks is not None:
        out, aux = out
        out = apply_sinks(out, getattr(aux, "lse", aux), spec.sinks)
    return out.transpose(1, 2)  # [B, S, nq, Hv]


def _flex_lse_kwargs() -> dict:
    """Ask flex for its log-sum-exp: ``return_aux`` since torch 2.9, ``return_lse`` before."""
    from torch.nn.attention import flex_attention as fa

    return {"return_aux": fa.AuxRequest(lse=True)} if hasattr(fa, "AuxRequest") else {"return_lse": True}


def apply_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Attention without sinks -> with them: out [B, nq, S, Hv], lse [B, nq, S] (natural log of each
    query's softmax denominator), sinks [nq]. A sink adds exp(sink) to the denominator only, so the
    output scales by exp(lse) / (exp(lse) + exp(sink)) = sigmoid(lse - sink); a query that sees no
    key (lse = -inf) stays 0. Differentiable in out, lse and sinks."""
    scale = torch.sigmoid(lse.float() - sinks.float().view(1, -1, 1))  # [B, nq, S]
    return (out.float() * scale.unsqueeze(-1)).to(out.dtype)


# --- eager --------------------------------------------------------------------------------------


def _eager(q, k, v, spec: AttnSpec) -> torch.Tensor:
    groups = q.shape[2] // k.shape[2]
    qt = q.transpose(1, 2)  # [B, nq, S, H]
    kt = _repeat_kv(k, groups).transpose(1, 2)  # [B, nq, S, H]
    vt = _repeat_kv(v, groups).transpose(1, 2)  # [B, nq, S, Hv]
    scores = torch.matmul(qt, kt.transpose(2, 3)) * spec.scale  # [B, nq, S, S]
    if spec.softcap is not None:
        scores = torch.tanh(scores / spec.softcap) * spec.softcap
    if spec.custom_mask is not None:
        mask = _custom_dense(spec.custom_mask, scores.dtype)
    else:
        mask = _dense(spec, q.device) if (spec.causal or not spec.info.is_plain or spec.window) else None
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    if spec.sinks is not None:  # one more logit per query, the head's sink, dropped after the softmax
        sink = spec.sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:3], 1)  # [B, nq, S, 1]
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1, dtype=torch.float32)[..., :-1].to(q.dtype)
    else:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if spec.dropout > 0:
        probs = F.dropout(probs, p=spec.dropout, training=True)
    return torch.matmul(probs, vt).transpose(1, 2)  # [B, S, nq, Hv]
