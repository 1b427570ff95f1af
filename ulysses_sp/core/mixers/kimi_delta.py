"""Kimi Delta Attention (Kimi-Linear's KDA: a gated delta rule with a per-channel decay) under Ulysses SP.

Shape legend: B batch, S full sequence, s = S/P local tokens, D hidden size, N heads of width H
(n of them on this rank).

    projections on [B, s, D] (every head) -> q, k, v, f [B, s, N, H] (f: the forget gate before its
                                             activation), b [B, s, N]
    one all-to-all (q|k|v|f|b)            -> [B, S, n, ...]
    conv1d over S (my channels' rows), decay g from f with my heads' A_log / dt_bias (fp32, as the
    module), KDA over S per head (both restart at documents)
    all-to-all back                        -> o [B, s, N, H]; gated RMSNorm; o_proj

The forget gate travels before its fp32 activation, in the model's dtype, so the exchange carries
nothing wider than the projections (the module computes the same activation on the same values).
"""

from __future__ import annotations

import torch

from . import common
from .common import MixerContext

CLASSES = ("KimiLinearDeltaAttention",)
#: what the forward below reads of the module (checked by patch: a transformers that renamed it is refused)
READS = (
    "num_heads",
    "head_dim",
    "qkv_dim",
    "q_proj",
    "k_proj",
    "v_proj",
    "b_proj",
    "forget_gate",
    "g_a_proj",
    "g_b_proj",
    "o_norm",
    "o_proj",
    "conv1d",
    "activation",
)


def _kernel(module):
    return common.model_function(module, "chunk_kimi_delta_attention", "chunk_kda")


def make_context(module: torch.nn.Module, topology) -> MixerContext:
    common.require(module, _kernel(module), "chunked KDA", "flash-linear-attention")
    n = module.num_heads
    return MixerContext(topology, common.plan(n, n, topology.sp_size, f"linear_num_heads={n}"))


def _decay(gate: torch.nn.Module, f: torch.Tensor, heads: slice) -> torch.Tensor:
    """KimiLinearForgetGate's activation on my heads: f [B, S, n, H] -> g [B, S, n, H] (fp32, <= 0)."""
    H = f.shape[-1]
    bias = gate.dt_bias.float().view(-1, H)[heads]  # [n, H]
    g = f.float() + bias
    g = torch.where(g > 20.0, g, torch.log(1.0 + torch.exp(g)))  # softplus capped as the module does it
    return -torch.exp(gate.A_log.float().view(-1)[heads])[:, None] * g


def forward(module, ctx: MixerContext, hidden_states: torch.Tensor, attention_mask=None, **kwargs) -> torch.Tensor:
    """The layer on the local shard: [B, s, D] -> [B, s, D]."""
    hidden_states, info = common.begin(ctx, hidden_states, kwargs)
    B, s, _ = hidden_states.shape
    N, H = module.num_heads, module.head_dim
    fg = module.forget_gate
    projections = (module.q_proj, module.k_proj, module.v_proj, lambda h: fg.f_b_proj(fg.f_a_proj(h)))
    q, k, v, f = (p(hidden_states).view(B, s, N, H) for p in projections)  # [B, s, N, H]
    q, k, v, f, b = common.to_heads(ctx, [q, k, v, f, module.b_proj(hidden_states).unsqueeze(-1)], [False] * 5)
    n, mine = q.shape[2], ctx.heads
    rows = torch.arange(mine.start * H, mine.stop * H, device=q.device)
    rows = torch.cat([rows, rows + module.qkv_dim, rows + 2 * module.qkv_dim])  # q, k, v channels of my heads
    spans = common.documents(info)
    x = torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], dim=-1)  # [B, S, 3*n*H]
    x = common.causal_conv(module, module.conv1d, rows, x, spans, module.activation)
    q, k, v = (t.unflatten(-1, (n, H)) for t in x.chunk(3, dim=-1))  # [B, S, n, H]
    g, beta = _decay(fg, f, mine), b.squeeze(-1).sigmoid()
    kernel = _kernel(module)

    def scan(q, k, v, g, beta):
        out, _ = kernel(
            q, k, v, g=g, beta=beta, initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=True
        )
        return out  # [B, len, n, H]

    out = common.to_tokens(ctx, common.per_document(scan, spans, q, k, v, g, beta))  # [B, s, N, H]
    gate = module.g_b_proj(module.g_a_proj(hidden_states)).view(B, s, N, H)
    return module.o_proj(module.o_norm(out, gate).reshape(B, s, -1))  # [B, s, D]
