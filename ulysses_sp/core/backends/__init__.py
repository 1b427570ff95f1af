"""Core attention kernels (one module per backend) over the full sequence, run between the two all-to-alls.

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

import torch

from . import eager, flash, flex, sdpa
from .spec import AttnSpec

SUPPORTED = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention", "eager")
#: backends that apply attention sinks: eager as one more logit, flex by renormalising with its lse
SINK_BACKENDS = ("eager", "flex_attention")

__all__ = ["SINK_BACKENDS", "SUPPORTED", "AttnSpec", "run"]


def run(impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttnSpec) -> torch.Tensor:
    """[B, S, nq, H], [B, S, nk, H], [B, S, nk, Hv] -> [B, S, nq, Hv]."""
    if spec.window is not None and spec.window >= spec.info.seq_len:
        spec.window = None  # a window longer than the sequence is full attention
    if spec.chunk is not None and spec.chunk >= spec.info.seq_len:
        spec.chunk = None  # one chunk holds the whole sequence
    if spec.sinks is not None and impl not in SINK_BACKENDS:
        raise ValueError(
            f"this model has attention sinks (s_aux, e.g. GPT-OSS), which ulysses_sp applies on "
            f"{' and '.join(SINK_BACKENDS)} only, not on {impl}; load the model with attn_implementation='eager' "
            "or 'flex_attention'"
        )
    if impl == "sdpa":
        return sdpa.attend(q, k, v, spec)
    if impl in ("flash_attention_2", "flash_attention_3"):
        return flash.attend(q, k, v, spec, version=3 if impl.endswith("3") else 2)
    if impl == "flex_attention":
        return flex.attend(q, k, v, spec)
    if impl == "eager":
        return eager.attend(q, k, v, spec)
    raise AssertionError(f"unsupported backend {impl!r} passed validation")
