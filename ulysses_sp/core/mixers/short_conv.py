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

from .common import (
    MixerContext,
    causal_conv,
    documents,
    local_padding,
    model_function,
    per_document,
    plan,
    sequence_info,
    to_heads,
    to_tokens,
)

CLASSES = ("Lfm2ShortConv", "Lfm2MoeShortConv")


def make_context(module: torch.nn.Module, topology) -> MixerContext:
    channels = module.conv.in_channels
    return MixerContext(topology, plan(channels, channels, topology.sp_size, f"hidden_size={channels} channels"))


def forward(module, ctx: MixerContext, hidden_states: torch.Tensor, attention_mask=None, **kwargs) -> torch.Tensor:
    """The layer on the local shard: [B, s, D] -> [B, s, D]."""
    if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        raise ValueError("ulysses_sp does not run convolution layers with a cache (generation); use_cache=False")
    info = sequence_info(ctx, kwargs)
    keep = local_padding(info, ctx.topology)
    if keep is not None:
        hidden_states = hidden_states * keep[:, :, None].to(hidden_states.dtype)
    b, c, x = module.in_proj(hidden_states).chunk(3, dim=-1)  # [B, s, D] each
    (bx,) = to_heads(ctx, [(b * x).unsqueeze(-1)], [False])  # [B, S, d, 1]
    mine = ctx.heads
    weight = module.conv.weight.squeeze(1)[mine]  # [d, K]
    bias = None if module.conv.bias is None else module.conv.bias[mine]  # [d]
    kernel = model_function(module, "causal_conv1d_fn")
    y = per_document(lambda t: causal_conv(t, weight, bias, None, kernel), documents(info), bx.squeeze(-1))  # [B, S, d]
    y = to_tokens(ctx, y.unsqueeze(-1)).squeeze(-1)  # [B, s, D]
    return module.out_proj(c * y)  # [B, s, D]
