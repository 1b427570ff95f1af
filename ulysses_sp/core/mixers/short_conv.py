"""LFM2's gated short convolution (Lfm2ShortConv, Lfm2MoeShortConv) under Ulysses SP.

Shape legend: B batch, S full sequence, s = S/P local tokens, D hidden size (= conv channels),
d of them on this rank, K conv width.

    in_proj on [B, s, D] -> gates b, c and input x [B, s, D]; b*x (per token, local)
    one all-to-all       -> [B, S, d]: the full sequence on this rank's channels
    depthwise causal conv over S with my channels' weights (restarting at documents)
    all-to-all back      -> [B, s, D]; c * y; out_proj

The convolution is depthwise, so a channel needs no other channel: each rank convolves D/P of them.
"""

from __future__ import annotations

import torch

from . import common
from .common import MixerContext

CLASSES = ("Lfm2ShortConv", "Lfm2MoeShortConv")
#: what the forward below reads of the module (checked by patch: a transformers that renamed it is refused)
READS = ("in_proj", "conv", "out_proj")


def make_context(module: torch.nn.Module, topology) -> MixerContext:
    channels = module.conv.in_channels
    return MixerContext(topology, common.plan(channels, channels, topology.sp_size, f"hidden_size={channels} channels"))


def forward(module, ctx: MixerContext, hidden_states: torch.Tensor, attention_mask=None, **kwargs) -> torch.Tensor:
    """The layer on the local shard: [B, s, D] -> [B, s, D]."""
    hidden_states, info = common.begin(ctx, hidden_states, kwargs)
    b, c, x = module.in_proj(hidden_states).chunk(3, dim=-1)  # [B, s, D] each
    (bx,) = common.to_heads(ctx, [(b * x).unsqueeze(-1)], [False])  # [B, S, d, 1]
    y = common.causal_conv(module, module.conv, ctx.heads, bx.squeeze(-1), common.documents(info), None)  # [B, S, d]
    y = common.to_tokens(ctx, y.unsqueeze(-1)).squeeze(-1)  # [B, s, D]
    return module.out_proj(c * y)  # [B, s, D]
