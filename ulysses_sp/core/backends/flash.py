"""flash-attn 2 and 3: the dense kernel for plain batches, the varlen kernel for packed/padded ones.

Shape legend: B batch, S full sequence, nq/nk heads on this rank, H head dim (Hv for values),
T valid tokens over B*S.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from .spec import AttnSpec
from .varlen import cu_seqlens, flatten_valid, unflatten_valid


@lru_cache(maxsize=2)
def flash_functions(version: int):
    """(flash_attn_func, flash_attn_varlen_func) of flash-attn 2 or 3; ImportError when absent."""
    if version == 3:
        from flash_attn_interface import flash_attn_func, flash_attn_varlen_func
    else:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    return flash_attn_func, flash_attn_varlen_func


def check_installed(impl: str) -> None:
    """ValueError when the kernel ``impl`` needs a package that is not installed (flash-attn 2 / 3)."""
    if impl in ("flash_attention_2", "flash_attention_3"):
        try:
            flash_functions(3 if impl.endswith("3") else 2)
        except ImportError as e:
            raise ValueError(
                f"attn_implementation={impl!r} needs the flash-attn package ({e}); install it with "
                "pip install 'ulysses_sp[flash]' or choose 'sdpa'"
            ) from None


def attend(q, k, v, spec: AttnSpec, version: int) -> torch.Tensor:
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
    if spec.chunk is not None:
        raise ValueError(
            f"flash-attention has no chunked attention (chunks of {spec.chunk} positions, Llama 4) under ulysses_sp; "
            "use attn_implementation='sdpa', 'flex_attention' or 'eager'"
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
        cu, max_len = cu_seqlens(spec.info, q.shape[0], q.device)
        qf, kf, vf = (flatten_valid(t, spec.info) for t in (q, k, v))  # [T, n, H]
        out = _kernel_output(
            varlen_func(
                qf, kf, vf, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len, **kwargs
            )
        )  # [T, nq, H]
        out = unflatten_valid(out, spec.info, q.shape[0])  # [B, S, nq, H]
    return out[..., :hv].to(in_dtype)


def _kernel_output(out):
    """flash-attn 3 returns (out, softmax_lse) in some releases, flash-attn 2 the output alone."""
    return out[0] if isinstance(out, tuple) else out
