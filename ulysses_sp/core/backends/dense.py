"""Dense-mask helpers of the sdpa and eager backends: kv heads repeated for masked GQA, a user's
mask as the kernel takes it, and the rule of masks.py as a dense [B|1, 1, S, S] mask (cached per step).

Shape legend: B batch, S full sequence, nk/nq heads on this rank, H head dim.
"""

from __future__ import annotations

import warnings

import torch

from .. import masks
from .spec import AttnSpec

#: above this many tokens sdpa avoids a dense S x S mask (flex on CUDA) or warns that it builds one
DENSE_MASK_WARN_TOKENS = 16384


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, S, nk, H] -> [B, S, nk*groups, H] (each kv head next to the q heads that read it)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


def custom_dense(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"a {type(mask).__name__} attention mask works only with attn_implementation='flex_attention'")
    return mask if mask.dtype == torch.bool else mask.to(dtype)


def dense_mask(spec: AttnSpec, device) -> torch.Tensor:
    S = spec.info.seq_len
    if S > DENSE_MASK_WARN_TOKENS:
        warnings.warn(
            f"ulysses_sp: building a dense {S}x{S} attention mask (packed/padded/windowed batch on a "
            "backend without a sparse route); use flash_attention_2 or flex_attention on GPU to avoid it",
            stacklevel=3,
        )
    key = ("dense", spec.causal, spec.window, spec.chunk, str(device))
    if key not in spec.info.cache:
        spec.info.cache[key] = masks.dense_mask(spec.info, spec.causal, spec.window, device, spec.chunk)
    return spec.info.cache[key]
