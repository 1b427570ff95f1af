"""Jamba's Mamba (selective scan, Mamba1) mixer under Ulysses SP.

Shape legend: B batch, S full sequence, s = S/P local tokens, D hidden size, I inner channels
(i of them on this rank), N state size, R rank of the time step.

    in_proj on [B, s, D]          -> x, gate [B, s, I]
    one all-to-all (x|gate)       -> [B, S, i]: the full sequence on this rank's channels
    depthwise conv over S (my channels' rows), per document
    x_proj is a sum over channels: each rank projects its i channels, one all-reduce over the SP
    group completes dt|B|C [B, S, R+2N] on every rank (its backward sums the ranks' gradients)
    dt/B/C norms; dt_proj rows of my channels; selective scan over S per channel, per document
    all-to-all back               -> [B, s, I]; out_proj

The selective scan is per channel (A, D, dt rows are per channel), so channels split like heads;
only B, C and dt mix channels, through x_proj, hence the all-reduce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import comm
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

CLASSES = ("JambaMambaMixer",)


def _scan_kernel(module):
    return model_function(module, "mamba_selective_scan", "selective_scan_fn")


def make_context(module: torch.nn.Module, topology) -> MixerContext:
    if _scan_kernel(module) is None:
        import transformers

        raise ValueError(
            f"{type(module).__name__}: this transformers ({transformers.__version__}) has no selective scan outside "
            "the layer's forward and mamba-ssm is not installed; ulysses_sp needs one to run the scan over the full "
            "sequence: pip install mamba-ssm, or upgrade transformers"
        )
    inner = module.intermediate_size
    return MixerContext(topology, plan(inner, inner, topology.sp_size, f"{inner} inner channels"))


def forward(module, ctx: MixerContext, hidden_states: torch.Tensor, attention_mask=None, **kwargs) -> torch.Tensor:
    """The mixer on the local shard: [B, s, D] -> [B, s, D]."""
    if kwargs.get("cache") is not None or kwargs.get("cache_params") is not None:
        raise ValueError("ulysses_sp does not run Mamba layers with a cache (generation); use_cache=False")
    info = sequence_info(ctx, kwargs)
    topo = ctx.topology
    dtype = hidden_states.dtype
    keep = local_padding(info, topo)
    if keep is not None:
        hidden_states = hidden_states * keep[:, :, None].to(dtype)
    x, gate = module.in_proj(hidden_states).chunk(2, dim=-1)  # [B, s, I] each
    x, gate = to_heads(ctx, [x.unsqueeze(-1), gate.unsqueeze(-1)], [False, False])  # [B, S, i, 1]
    x, gate = x.squeeze(-1), gate.squeeze(-1)  # [B, S, i]
    mine = ctx.heads
    conv = module.conv1d
    weight = conv.weight.squeeze(1)[mine]  # [i, K]
    bias = None if conv.bias is None else conv.bias[mine]
    conv_fn = model_function(module, "causal_conv1d_fn")
    spans = documents(info)
    x = per_document(lambda t: causal_conv(t, weight, bias, module.activation, conv_fn), spans, x)  # [B, S, i]
    if info is not None and info.key_valid is not None:  # transformers zeroes padding after the conv too
        x = x * info.key_valid[:, :, None].to(x.dtype)
    dbc = F.linear(x, module.x_proj.weight[:, mine])  # [B, S, R+2N]: my channels' share
    if topo.sp_size > 1:
        dbc = comm.all_reduce_autograd_sum(dbc, topo.sp_group)  # [B, S, R+2N]: all channels
    dt, b, c = dbc.split([module.time_step_rank, module.ssm_state_size, module.ssm_state_size], dim=-1)
    dt = F.linear(module.dt_layernorm(dt), module.dt_proj.weight[mine])  # [B, S, i], bias added in the scan
    b, c = module.b_layernorm(b), module.c_layernorm(c)  # [B, S, N]
    A = -torch.exp(module.A_log[mine].float())  # [i, N]
    dt_bias = None if module.dt_proj.bias is None else module.dt_proj.bias[mine].float()
    kernel = _scan_kernel(module)
    flags = {k: getattr(module, k) for k in ("use_mambapy", "use_associative_scan") if hasattr(module, k)}

    def scan(x, dt, b, c, gate):
        out = kernel(
            x.transpose(1, 2),  # [B, i, len]
            dt.transpose(1, 2),
            A,
            b.transpose(1, 2),  # [B, N, len]
            c.transpose(1, 2),
            D=module.D[mine].float(),
            z=gate.transpose(1, 2),
            delta_bias=dt_bias,
            delta_softplus=True,
            **flags,
        )
        return out.transpose(1, 2)  # [B, len, i], gated, D skip included

    y = per_document(scan, spans, x, dt, b, c, gate)  # [B, S, i]
    y = to_tokens(ctx, y.unsqueeze(-1)).squeeze(-1)  # [B, s, I]
    return module.out_proj(y.to(dtype))  # [B, s, D]
