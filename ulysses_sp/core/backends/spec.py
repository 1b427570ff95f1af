"""What one attention call must compute beyond q/k/v: :class:`AttnSpec`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sequence_info import SequenceInfo


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
    chunk: int | None = None  # chunked attention (Llama 4): keys in the query's chunk of `chunk` positions only
    sinks: torch.Tensor | None = None  # [nq] learnable sink logit per head (s_aux, GPT-OSS): one more softmax term
