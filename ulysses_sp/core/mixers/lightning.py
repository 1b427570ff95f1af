"""MiniMax's lightning attention (linear attention with a per-head exponential decay) under Ulysses SP.

Shape legend: B batch, S full sequence, s = S/P local tokens, D hidden size, N heads of width H (n on
this rank), L a document's length, T the block size.

    act(qkv_proj) on [B, s, D] (every head) -> q, k, v [B, s, N, H]
    one all-to-all                          -> [B, S, n, H]
    the block-wise decayed linear attention over S per head (per document)
    all-to-all back                         -> [B, s, N, H]; RMSNorm over N*H; sigmoid(output_gate) *; out_proj

transformers computes the recurrence inside the layer's forward (no kernel function to call), so
:func:`_scan` restates its block loop, on this rank's heads' decay buffers; the cached (decode) branch
is not needed for training and is refused.
"""

from __future__ import annotations

import torch

from . import common
from .common import MixerContext

CLASSES = ("MiniMaxLightningAttention",)


#: what the forward below reads of the module (checked by patch: a transformers that renamed it is refused)
READS = (
    "num_attention_heads",
    "head_dim",
    "qkv_proj",
    "act_fn",
    "norm",
    "output_gate",
    "out_proj",
    "block_size",
    "slope_rate",
    "query_decay",
    "key_decay",
    "diagonal_decay",
)


def make_context(module: torch.nn.Module, topology) -> MixerContext:
    n = module.num_attention_heads
    return MixerContext(topology, common.plan(n, n, topology.sp_size, f"num_attention_heads={n} (lightning)"))


def _scan(module, heads: slice, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Decayed linear attention of one document, as MiniMaxLightningAttention's block loop:
    q, k, v [B, L, n, H] -> [B, L, n, H]."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, n, L, H]
    B, n, L, H = q.shape
    slope = module.slope_rate[heads]  # [n, 1, 1]
    q_decay, k_decay = module.query_decay[heads], module.key_decay[heads]  # [n, T, 1]
    diag = module.diagonal_decay[:, heads]  # [1, n, T, T]
    state = q.new_zeros(B, n, H, H)  # K^T V of the blocks so far
    out = []
    for lo in range(0, L, module.block_size):
        t = min(module.block_size, L - lo)
        qb, kb, vb = (x[:, :, lo : lo + t] for x in (q, k, v))  # [B, n, t, H]
        intra = torch.matmul(torch.matmul(qb, kb.transpose(-1, -2)) * diag[:, :, :t, :t], vb)
        inter = torch.matmul(qb * q_decay[:, :t], state)
        out.append(intra + inter)
        state = state * torch.exp(-slope * t) + torch.matmul((kb * k_decay[:, -t:]).transpose(-1, -2), vb)
    return torch.cat(out, dim=2).transpose(1, 2)  # [B, L, n, H]


def forward(module, ctx: MixerContext, hidden_states: torch.Tensor, *args, **kwargs):
    """The layer on the local shard: [B, s, D] -> ([B, s, D], None)."""
    hidden_states, info = common.begin(ctx, hidden_states, kwargs)
    B, s, _ = hidden_states.shape
    N, H = module.num_attention_heads, module.head_dim
    qkv = module.act_fn(module.qkv_proj(hidden_states)).view(B, s, N, 3 * H)  # padding already zeroed
    q, k, v = common.to_heads(ctx, list(qkv.split(H, dim=-1)), [False] * 3)  # [B, S, n, H]
    heads = ctx.heads
    out = common.per_document(lambda q, k, v: _scan(module, heads, q, k, v), common.documents(info), q, k, v)
    out = module.norm(common.to_tokens(ctx, out).reshape(B, s, N * H))  # [B, s, N*H]
    out = torch.sigmoid(module.output_gate(hidden_states)) * out
    return module.out_proj(out), None
