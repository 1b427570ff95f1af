"""The Mamba2 mixer (SSD scan) of Nemotron-H, Falcon-H1, Bamba, Granite-MoE-hybrid and Zamba2 under
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

CLASSES = ("NemotronHMamba2Mixer", "FalconH1Mixer", "BambaMixer", "GraniteMoeHybridMambaLayer", "Zamba2MambaMixer")


def _scan_kernel(module):
    return model_function(module, "mamba2_chunk_scan", "mamba_chunk_scan_combined")


def make_context(module: torch.nn.Module, topology) -> MixerContext:
    if _scan_kernel(module) is None:
        import transformers

        raise ValueError(
            f"{type(module).__name__}: this transformers ({transformers.__version__}) has no torch version of the "
            "Mamba2 chunked scan outside the layer's forward, and mamba-ssm is not installed; ulysses_sp needs one "
            "of them to run the scan over the full sequence: pip install mamba-ssm, or upgrade transformers"
        )
    nh, ng = module.num_heads, module.n_groups
    what = f"{nh} SSM heads in {ng} groups (mamba heads / n_groups)"
    return MixerContext(topology, plan(nh, ng, topology.sp_size, what))


def _conv_rows(module, ctx: MixerContext) -> torch.Tensor:
    """Rows of the depthwise conv for this rank's channels: x of my heads, then B and C of my groups."""
    rank = ctx.topology.sp_rank
    hd, n, inter, gn = (
        module.head_dim,
        module.ssm_state_size,
        module.intermediate_size,
        module.n_groups * module.ssm_state_size,
    )
    x_ch = [h * hd + i for h in ctx.plan.q_heads[rank] for i in range(hd)]
    b_ch = [inter + g * n + i for g in ctx.plan.kv_heads[rank] for i in range(n)]
    return torch.tensor(x_ch + b_ch + [c + gn for c in b_ch], device=module.conv1d.weight.device)


def forward(module, ctx: MixerContext, hidden_states: torch.Tensor, attention_mask=None, **kwargs) -> torch.Tensor:
    """The mixer on the local shard: [B, s, D] -> [B, s, D]."""
    if kwargs.get("cache") is not None or kwargs.get("cache_params") is not None:
        raise ValueError("ulysses_sp does not run Mamba layers with a cache (generation); use_cache=False")
    info = sequence_info(ctx, kwargs)
    topo = ctx.topology
    keep = local_padding(info, topo)
    dtype = hidden_states.dtype
    if keep is not None:
        hidden_states = hidden_states * keep[:, :, None].to(dtype)
    if hasattr(module, "ssm_in_multiplier"):  # Falcon-H1's muP scalings around the projection
        hidden_states = hidden_states * module.ssm_in_multiplier
    proj = module.in_proj(hidden_states)  # [B, s, I + conv_dim + Nh]
    if hasattr(module, "mup_vector"):
        proj = proj * module.mup_vector
    inter, gn, Nh, Hd = (
        module.intermediate_size,
        module.n_groups * module.ssm_state_size,
        module.num_heads,
        module.head_dim,
    )
    gate, x, b, c, dt = proj.split([inter, inter, gn, gn, Nh], dim=-1)
    Bsz, s, _ = x.shape
    grouped = [t.unflatten(-1, (module.n_groups, module.ssm_state_size)) for t in (b, c)]  # [B, s, G, N]
    x, b, c, dt = to_heads(ctx, [x.unflatten(-1, (Nh, Hd)), *grouped, dt.unsqueeze(-1)], [False, True, True, False])
    nh, g = x.shape[2], b.shape[2]
    spans = documents(info)
    rows = _conv_rows(module, ctx)
    weight = module.conv1d.weight.squeeze(1).index_select(0, rows)  # [C, K]
    bias = None if module.conv1d.bias is None else module.conv1d.bias.index_select(0, rows)
    conv_fn = model_function(module, "causal_conv1d_fn")
    xbc = torch.cat([x.flatten(2), b.flatten(2), c.flatten(2)], dim=-1)  # [B, S, C]
    xbc = per_document(lambda t: causal_conv(t, weight, bias, module.activation, conv_fn), spans, xbc)
    if info is not None and info.key_valid is not None:  # transformers zeroes padding after the conv too
        xbc = xbc * info.key_valid[:, :, None].to(xbc.dtype)
    x, b, c = xbc.split([nh * Hd, g * module.ssm_state_size, g * module.ssm_state_size], dim=-1)
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

    y = per_document(
        scan,
        spans,
        x.unflatten(-1, (nh, Hd)),
        dt.squeeze(-1),
        b.unflatten(-1, (g, module.ssm_state_size)),
        c.unflatten(-1, (g, module.ssm_state_size)),
    )  # [B, S, nh, Hd]
    y = to_tokens(ctx, y).view(Bsz, s, inter)  # [B, s, I]
    if getattr(module, "mamba_rms_norm", True):
        y = module.norm(y, gate)
    else:  # Falcon-H1 without the mixer norm: a plain SiLU gate
        y = y * F.silu(gate)
    return module.out_proj(y.to(dtype))  # [B, s, D]
