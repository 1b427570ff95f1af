"""The Mamba (selective scan, Mamba1) mixer of Jamba, Mamba and Falcon-Mamba under Ulysses SP.

Shape legend: B batch, S full sequence, s = S/P local tokens, D hidden size, I inner channels
(i of them on this rank), N state size, R rank of the time step.

    in_proj on [B, s, D]          -> x, gate [B, s, I]
    one all-to-all (x|gate)       -> [B, S, i]: the full sequence on this rank's channels
    depthwise conv over S (my channels' rows), per document
    x_proj is a sum over channels: each rank projects its i channels, one all-reduce over the SP
    group completes dt|B|C [B, S, R+2N] on every rank (its backward sums the ranks' gradients)
    dt/B/C norms (Jamba); dt_proj rows of my channels; selective scan over S per channel, per document
    all-to-all back               -> [B, s, I]; out_proj

The selective scan is per channel (A, D, dt rows are per channel), so channels split like heads;
only B, C and dt mix channels, through x_proj, hence the all-reduce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import comm
from . import common
from .common import MixerContext

CLASSES = ("JambaMambaMixer", "MambaMixer", "FalconMambaMixer")
#: what the forward below reads of the module (checked by patch: a transformers that renamed it is refused)
READS = (
    "intermediate_size",
    "time_step_rank",
    "ssm_state_size",
    "in_proj",
    "conv1d",
    "activation",
    "x_proj",
    "dt_proj",
    "A_log",
    "D",
    "out_proj",
)


def _scan_kernel(module):
    return common.model_function(module, "mamba_selective_scan", "selective_scan_fn")


def make_context(module: torch.nn.Module, topology) -> MixerContext:
    common.require(module, _scan_kernel(module), "selective scan", "mamba-ssm")
    inner = module.intermediate_size
    return MixerContext(topology, common.plan(inner, inner, topology.sp_size, f"{inner} inner channels"))


def forward(module, ctx: MixerContext, hidden_states: torch.Tensor, attention_mask=None, **kwargs) -> torch.Tensor:
    """The mixer on the local shard: [B, s, D] -> [B, s, D]."""
    dtype = hidden_states.dtype
    hidden_states, info = common.begin(ctx, hidden_states, kwargs)
    topo = ctx.topology
    x, gate = module.in_proj(hidden_states).chunk(2, dim=-1)  # [B, s, I] each
    x, gate = (t.squeeze(-1) for t in common.to_heads(ctx, [x.unsqueeze(-1), gate.unsqueeze(-1)], [False, False]))
    mine = ctx.heads  # x, gate: [B, S, i]
    spans = common.documents(info)
    x = common.causal_conv(module, module.conv1d, mine, x, spans, module.activation)  # [B, S, i]
    if info is not None and info.key_valid is not None:  # transformers zeroes padding after the conv too
        x = x * info.key_valid[:, :, None].to(x.dtype)
    dbc = F.linear(x, module.x_proj.weight[:, mine])  # [B, S, R+2N]: my channels' share
    if topo.sp_size > 1:
        dbc = comm.all_reduce_autograd_sum(dbc, topo.sp_group)  # [B, S, R+2N]: all channels
    dt, b, c = dbc.split([module.time_step_rank, module.ssm_state_size, module.ssm_state_size], dim=-1)
    if hasattr(module, "dt_layernorm"):  # Jamba and Falcon-Mamba normalise dt, B and C; Mamba does not
        dt, b, c = module.dt_layernorm(dt), module.b_layernorm(b), module.c_layernorm(c)
    dt = F.linear(dt, module.dt_proj.weight[mine])  # [B, S, i], bias added in the scan
    A = -torch.exp(module.A_log[mine].float())  # [i, N]
    dt_bias = None if module.dt_proj.bias is None else module.dt_proj.bias[mine].float()
    kernel = _scan_kernel(module)
    flags = {k: getattr(module, k) for k in ("use_mambapy", "use_associative_scan") if hasattr(module, k)}

    def scan(x, dt, b, c, gate):
        channels_first = (t.transpose(1, 2) for t in (x, dt, b, c, gate))  # [B, i|N, len]
        x, dt, b, c, gate = channels_first
        out = kernel(x, dt, A, b, c, D=module.D[mine].float(), z=gate, delta_bias=dt_bias, delta_softplus=True, **flags)
        return out.transpose(1, 2)  # [B, len, i], gated, D skip included

    y = common.per_document(scan, spans, x, dt, b, c, gate)  # [B, S, i]
    y = common.to_tokens(ctx, y.unsqueeze(-1)).squeeze(-1)  # [B, s, I]
    return module.out_proj(y.to(dtype))  # [B, s, D]
