"""Gated DeltaNet (Qwen3-Next, Qwen3.5, Qwen3.5-MoE, OLMo-hybrid) under Ulysses SP.

Shape legend: B batch, S full sequence, s = S/P local tokens, Nk/Nv key/value heads of the layer
(Nv a multiple of Nk), nk/nv those of this rank, Hk/Hv head dims, D hidden size.

    projections on [B, s, D] (every head) -> q, k [B, s, Nk, Hk], v, z [B, s, Nv, Hv], b, a [B, s, Nv]
    one all-to-all (q|k|v|b|a)            -> [B, S, nk|nv, ...]: value heads split like query heads
                                             of GQA, key heads go to the ranks whose value heads read them
    conv1d over S (weights of my channels), gated delta rule over S per head (reset at documents)
    all-to-all back                        -> o [B, s, Nv, Hv]; gated RMSNorm with z; out_proj

transformers' forward runs its reshapes on the shard's length, so it cannot be wrapped; this forward
calls the module's own projections, norm, conv weights and the kernels transformers picked (FLA /
causal-conv1d on GPU when installed, the torch versions otherwise).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import common
from .common import MixerContext

CLASSES = ("Qwen3NextGatedDeltaNet", "Qwen3_5GatedDeltaNet", "Qwen3_5MoeGatedDeltaNet", "OlmoHybridGatedDeltaNet")
#: what the forward below reads of the module (checked by patch: a transformers that renamed it is refused)
READS = (
    "num_v_heads",
    "num_k_heads",
    "head_k_dim",
    "head_v_dim",
    "key_dim",
    "value_dim",
    "conv1d",
    "activation",
    "A_log",
    "dt_bias",
)


def make_context(module: torch.nn.Module, topology) -> MixerContext:
    nv, nk = module.num_v_heads, module.num_k_heads
    what = f"linear_num_value_heads={nv}, linear_num_key_heads={nk}"
    return MixerContext(topology, common.plan(nv, nk, topology.sp_size, what))


def _project(module, h: torch.Tensor):
    """Local projections with every head: q, k [B, s, Nk, Hk], v, z [B, s, Nv, Hv], b, a [B, s, Nv]."""
    B, s, _ = h.shape
    if hasattr(module, "in_proj_qkvz"):  # Qwen3-Next: heads grouped per key head in one projection
        return module.fix_query_key_value_ordering(module.in_proj_qkvz(h), module.in_proj_ba(h))
    if hasattr(module, "q_proj"):  # OLMo-hybrid: one projection each
        q, k, v, z = (p(h) for p in (module.q_proj, module.k_proj, module.v_proj, module.g_proj))
        b, a = module.b_proj(h), module.a_proj(h)
    else:  # Qwen3.5: q|k|v in one projection
        q, k, v = module.in_proj_qkv(h).split([module.key_dim, module.key_dim, module.value_dim], dim=-1)
        z, b, a = module.in_proj_z(h), module.in_proj_b(h), module.in_proj_a(h)
    q, k = (t.view(B, s, -1, module.head_k_dim) for t in (q, k))  # [B, s, Nk, Hk]
    v, z = (t.view(B, s, -1, module.head_v_dim) for t in (v, z))  # [B, s, Nv, Hv]
    return q, k, v, z, b, a


def _conv_rows(module, ctx: MixerContext) -> torch.Tensor:
    """The depthwise conv's rows of this rank's channels: q and k of my key heads, v of my value heads."""
    rank = ctx.topology.sp_rank
    hk, hv, kd = module.head_k_dim, module.head_v_dim, module.key_dim
    key_ch = [j * hk + i for j in ctx.plan.kv_heads[rank] for i in range(hk)]
    val_ch = [2 * kd + j * hv + i for j in ctx.plan.q_heads[rank] for i in range(hv)]
    return torch.tensor(key_ch + [kd + c for c in key_ch] + val_ch, device=module.conv1d.weight.device)


def forward(module, ctx: MixerContext, hidden_states: torch.Tensor, attention_mask=None, **kwargs) -> torch.Tensor:
    """The layer on the local shard: [B, s, D] -> [B, s, D]."""
    hidden_states, info = common.begin(ctx, hidden_states, kwargs)
    q, k, v, z, b, a = _project(module, hidden_states)
    B, s, Nk, Hk = q.shape
    q, k, v, b, a = common.to_heads(ctx, [q, k, v, b.unsqueeze(-1), a.unsqueeze(-1)], [True, True, False, False, False])
    nk, nv, Hv = q.shape[2], v.shape[2], module.head_v_dim
    spans = common.documents(info)
    x = torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], dim=-1)  # [B, S, C]
    x = common.causal_conv(module, module.conv1d, _conv_rows(module, ctx), x, spans, module.activation)
    q, k, v = x.split([nk * Hk, nk * Hk, nv * Hv], dim=-1)
    # each key head serves nv/nk consecutive value heads; repeated here as the kernels do inside (older
    # transformers repeated before calling them, and not every kernel version accepts nk < nv)
    q, k = (t.unflatten(-1, (nk, Hk)).repeat_interleave(nv // nk, dim=2) for t in (q, k))  # [B, S, nv, Hk]
    v = v.unflatten(-1, (nv, Hv))  # [B, S, nv, Hv]
    heads = ctx.heads
    beta = b.squeeze(-1).sigmoid()  # [B, S, nv]
    if getattr(module, "allow_neg_eigval", False):  # OLMo-hybrid: beta in [0, 2]
        beta = beta * 2.0
    # the decay as the module computes it, on my value heads' parameters (fp32: A_log.exp() overflows fp16)
    g = -module.A_log[heads].float().exp() * F.softplus(a.squeeze(-1).float() + module.dt_bias[heads])
    rule = common.model_function(module, "chunk_gated_delta_rule", "torch_chunk_gated_delta_rule")

    def scan(q, k, v, g, beta):
        out, _ = rule(
            q, k, v, g=g, beta=beta, initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=True
        )
        return out  # [B, len, nv, Hv]

    out = common.to_tokens(ctx, common.per_document(scan, spans, q, k, v, g, beta))  # [B, s, Nv, Hv]
    norm, proj = (module.norm, module.out_proj) if hasattr(module, "out_proj") else (module.o_norm, module.o_proj)
    out = norm(out.reshape(-1, Hv), z.reshape(-1, Hv))  # [B*s*Nv, Hv]
    return proj(out.view(B, s, -1))  # [B, s, D]
