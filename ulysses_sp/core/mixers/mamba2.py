"""The Mamba2 mixer (SSD scan) of Mamba2, Nemotron-H, Falcon-H1, Bamba, Granite-MoE-hybrid and Zamba2 under
Ulysses SP.

Shape legend: B batch, S full sequence, s = S/P local tokens, D hidden size, Nh SSM heads of width
Hd (I = Nh*Hd), G groups of the B/C projections (Nh a multiple of G) with state size N, nh/g those
of this rank.

    in_proj on [B, s, D] (every head)  -> gate [B, s, I], x [B, s, Nh, Hd], B, C [B, s, G, N], dt [B, s, Nh]
    one all-to-all (x|B|C|dt)          -> [B, S, nh|g, ...]: heads split like query heads of GQA, the
                                          B/C groups go to the ranks whose heads read them
    conv1d over S (my channels' rows), SSD scan over S per head (both restart at documents)
    all-to-all back                    -> y [B, s, I]; gated RMSNorm with the gate; out_proj

transformers' forward reshapes on the shard's length (and its fused training kernel does conv, scan,
norm and projection in one call), so this forward calls the module's projections, norm and weights
and the scan transformers picked: mamba-ssm's ``mamba_chunk_scan_combined`` when installed, else its
torch version (``mamba2_chunk_scan``, transformers >= 5.2x).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import common
from .common import MixerContext

CLASSES = (
    "Mamba2Mixer",
    "NemotronHMamba2Mixer",
    "FalconH1Mixer",
    "BambaMixer",
    "GraniteMoeHybridMambaLayer",
    "Zamba2MambaMixer",
)
#: what the forward below reads of the module (checked by patch: a transformers that renamed it is refused)
READS = (
    "num_heads",
    "head_dim",
    "n_groups",
    "ssm_state_size",
    "intermediate_size",
    "chunk_size",
    "time_step_limit",
    "in_proj",
    "conv1d",
    "activation",
    "A_log",
    "D",
    "dt_bias",
    "norm",
    "out_proj",
)


def _scan_kernel(module):
    return common.model_function(module, "mamba2_chunk_scan", "mamba_chunk_scan_combined")


def make_context(module: torch.nn.Module, topology) -> MixerContext:
    common.require(module, _scan_kernel(module), "torch Mamba2 chunked scan", "mamba-ssm")
    nh, ng = module.num_heads, module.n_groups
    what = f"{nh} SSM heads in {ng} groups (mamba heads / n_groups)"
    return MixerContext(topology, common.plan(nh, ng, topology.sp_size, what))


def _conv_rows(module, ctx: MixerContext) -> torch.Tensor:
    """Rows of the depthwise conv for this rank's channels: x of my heads, then B and C of my groups."""
    rank = ctx.topology.sp_rank
    hd, n, inter = module.head_dim, module.ssm_state_size, module.intermediate_size
    x_ch = [h * hd + i for h in ctx.plan.q_heads[rank] for i in range(hd)]
    b_ch = [inter + g * n + i for g in ctx.plan.kv_heads[rank] for i in range(n)]
    c_ch = [ch + module.n_groups * n for ch in b_ch]
    return torch.tensor(x_ch + b_ch + c_ch, device=module.conv1d.weight.device)


def forward(module, ctx: MixerContext, hidden_states: torch.Tensor, attention_mask=None, **kwargs) -> torch.Tensor:
    """The mixer on the local shard: [B, s, D] -> [B, s, D]."""
    dtype = hidden_states.dtype
    hidden_states, info = common.begin(ctx, hidden_states, kwargs)
    if hasattr(module, "ssm_in_multiplier"):  # Falcon-H1's muP scalings around the projection
        hidden_states = hidden_states * module.ssm_in_multiplier
    proj = module.in_proj(hidden_states)  # [B, s, I + conv_dim + Nh]
    if hasattr(module, "mup_vector"):
        proj = proj * module.mup_vector
    inter, Nh, Hd, N = module.intermediate_size, module.num_heads, module.head_dim, module.ssm_state_size
    gn = module.n_groups * N
    gate, x, b, c, dt = proj.split([inter, inter, gn, gn, Nh], dim=-1)
    Bsz, s, _ = x.shape
    grouped = [t.unflatten(-1, (module.n_groups, N)) for t in (b, c)]  # [B, s, G, N]
    x, b, c, dt = common.to_heads(
        ctx, [x.unflatten(-1, (Nh, Hd)), *grouped, dt.unsqueeze(-1)], [False, True, True, False]
    )
    nh, g = x.shape[2], b.shape[2]
    spans = common.documents(info)
    xbc = torch.cat([x.flatten(2), b.flatten(2), c.flatten(2)], dim=-1)  # [B, S, C]
    xbc = common.causal_conv(module, module.conv1d, _conv_rows(module, ctx), xbc, spans, module.activation)
    if info is not None and info.key_valid is not None:  # transformers zeroes padding after the conv too
        xbc = xbc * info.key_valid[:, :, None].to(xbc.dtype)
    x, b, c = xbc.split([nh * Hd, g * N, g * N], dim=-1)
    heads = ctx.heads
    A = -torch.exp(module.A_log[heads].float())  # [nh]
    kernel = _scan_kernel(module)

    def scan(x, dt, b, c):
        return kernel(
            x,
            dt,
            A,
            b,
            c,
            chunk_size=module.chunk_size,
            D=module.D[heads],
            dt_bias=module.dt_bias[heads],
            dt_softplus=True,
            dt_limit=module.time_step_limit,
        )  # [B, len, nh, Hd], D skip included

    y = common.per_document(
        scan, spans, x.unflatten(-1, (nh, Hd)), dt.squeeze(-1), b.unflatten(-1, (g, N)), c.unflatten(-1, (g, N))
    )  # [B, S, nh, Hd]
    y = common.to_tokens(ctx, y).view(Bsz, s, inter)  # [B, s, I]
    if getattr(module, "mamba_rms_norm", True):
        y = module.norm(y, gate)
    else:  # Falcon-H1 without the mixer norm: a plain SiLU gate
        y = y * F.silu(gate)
    return module.out_proj(y.to(dtype))  # [B, s, D]
