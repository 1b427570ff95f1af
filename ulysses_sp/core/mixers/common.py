"""What every sequence mixer under SP shares: the channel re-sharding, per-document runs, the
depthwise causal convolution on a rank's channels, and the model's own kernels.

Shape legend: B batch, S full sequence, s = S/P local tokens, P = sp_size, N heads (or channel
groups) of a projection, n of them on this rank, H per-head width, C = n*H channels, K conv width.

A mixer's projections run on the local tokens with every head; :func:`to_heads` trades tokens for
heads (one fused all-to-all, core/all_to_all.py), the sequence mixing runs over all S tokens on this
rank's heads, and :func:`to_tokens` trades them back before the output projection.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from ..all_to_all import heads_to_seq, seq_to_heads
from ..heads import HeadPlan, plan_heads
from ..sequence_info import SEQ_INFO_KWARG, SequenceInfo
from ..topology import SPTopology


@dataclass
class MixerContext:
    """One patched mixer module's SP state: the topology and its head plan (``q_heads``: the heads the
    recurrence runs on, ``kv_heads``: the shared heads they read, e.g. Gated DeltaNet's key heads)."""

    topology: SPTopology
    plan: HeadPlan
    step: object = None  # the model's Patched: the step's SequenceInfo when a layer drops the keyword

    @property
    def heads(self) -> slice:
        """This rank's main heads as a slice (a contiguous range)."""
        return self.plan.q_slice(self.topology.sp_rank)


def plan(num_heads: int, num_shared: int, sp: int, what: str) -> HeadPlan:
    """The head plan of a mixer with ``num_heads`` heads reading ``num_shared`` shared heads; a clear
    refusal when SP has more ranks than heads (``what`` names the config fields)."""
    if sp > num_heads:
        raise ValueError(
            f"sp_size={sp} exceeds the {num_heads} heads of the sequence mixer ({what}): each SP rank runs the "
            f"recurrence on whole heads over the full sequence, so it needs at least one; use sp_size <= {num_heads}"
        )
    return plan_heads(num_heads, num_shared, sp)


def to_heads(ctx: MixerContext, tensors: list[torch.Tensor], shared: list[bool]) -> list[torch.Tensor]:
    """[B, s, N_i, H_i] with every head -> [B, S, n_i, H_i] with this rank's heads (shared[i]: tensor i
    holds shared heads, planned like kv heads). Identity at P = 1."""
    topo = ctx.topology
    if topo.sp_size == 1:
        return tensors
    plans = [ctx.plan.kv_heads if sh else ctx.plan.q_heads for sh in shared]
    return seq_to_heads(tensors, plans, topo.sp_group, topo.sp_rank)  # [B, S, n_i, H_i]


def to_tokens(ctx: MixerContext, x: torch.Tensor) -> torch.Tensor:
    """[B, S, n, H] of this rank's main heads -> [B, s, N, H] with every head. Identity at P = 1."""
    topo = ctx.topology
    if topo.sp_size == 1:
        return x
    return heads_to_seq(x, ctx.plan.q_heads, topo.sp_group, topo.sp_rank).contiguous()  # [B, s, N, H]


def begin(ctx: MixerContext, hidden_states: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, SequenceInfo | None]:
    """What every mixer forward does first: refuse a cache, find the step's SequenceInfo, and zero the
    shard's padding tokens as transformers does before a recurrent mixer (apply_mask_to_padding_states).

    The SequenceInfo is the call's keyword when the decoder layer passes keywords down, else the one
    apply's pre-hook recorded for this model call (the same object)."""
    if any(kwargs.get(k) is not None for k in ("cache", "cache_params", "past_key_values")):
        raise ValueError(
            "ulysses_sp runs sequence mixers over a sharded sequence for training and scoring; a cache "
            "(generation) is not supported: pass use_cache=False"
        )
    info = kwargs.get(SEQ_INFO_KWARG)
    info = info if info is not None else ctx.step.info
    if info is not None and info.key_valid is not None:
        topo = ctx.topology
        s = info.seq_len // topo.sp_size
        keep = info.key_valid[:, topo.sp_rank * s : (topo.sp_rank + 1) * s]  # [B, s]
        hidden_states = hidden_states * keep[:, :, None].to(hidden_states.dtype)
    return hidden_states, info


def documents(info: SequenceInfo | None) -> list[list[tuple[int, int]]] | None:
    """Per row, the [start, end) spans of its packed documents over the full sequence; None when every
    row is one sequence. One host sync per step (cached on the step's SequenceInfo)."""
    if info is None or info.doc_ids is None:
        return None

    spans = info.cache.get("mixer_documents")
    if spans is None:
        ids = info.doc_ids  # [B, S]
        starts = torch.ones_like(ids, dtype=torch.bool)
        starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
        S = ids.shape[1]
        spans = []
        for row in starts.cpu():
            cuts = row.nonzero().squeeze(1).tolist() + [S]
            spans.append(list(zip(cuts[:-1], cuts[1:])))
        info.cache["mixer_documents"] = spans
    return spans


def per_document(fn: Callable, spans, *tensors: torch.Tensor) -> torch.Tensor:
    """``fn(*tensors)`` over the sequence dim 1 of [B, S, ...] tensors, run on each packed document on
    its own (a recurrence or convolution then starts fresh at every document), concatenated back."""
    if spans is None:
        return fn(*tensors)
    rows = []
    for b, row in enumerate(spans):
        parts = [fn(*(t[b : b + 1, lo:hi] for t in tensors)) for lo, hi in row]  # [1, len, ...] each
        rows.append(torch.cat(parts, dim=1))  # [1, S, ...]
    return torch.cat(rows, dim=0)  # [B, S, ...]


def causal_conv(
    module: torch.nn.Module,
    conv: torch.nn.Conv1d,
    rows: torch.Tensor | slice,
    x: torch.Tensor,
    spans,
    activation: str | None,
) -> torch.Tensor:
    """The depthwise causal ``conv`` of ``module`` on this rank's channels over the full sequence, each
    packed document on its own: x [B, S, C] holds the channels ``rows`` of the conv (indices or a slice)
    -> [B, S, C].

    The kernel is the model's ``causal_conv1d_fn`` (causal-conv1d's CUDA kernel or transformers' torch
    version, both [B, C, S]), else the same computation with F.conv1d (older transformers without one).
    """
    pick = (lambda t: t[rows]) if isinstance(rows, slice) else (lambda t: t.index_select(0, rows))
    weight = pick(conv.weight.squeeze(1))  # [C, K]
    bias = None if conv.bias is None else pick(conv.bias)  # [C]
    kernel = model_function(module, "causal_conv1d_fn")

    def run(t: torch.Tensor) -> torch.Tensor:
        xt = t.transpose(1, 2)  # [B, C, len]
        if kernel is not None:
            return kernel(xt, weight, bias, activation=activation).transpose(1, 2)  # [B, len, C]
        out = F.conv1d(
            xt.to(weight.dtype), weight.unsqueeze(1), bias, padding=weight.shape[1] - 1, groups=weight.shape[0]
        )
        out = out[..., : t.shape[1]]  # [B, C, len]: the causal part
        if activation is not None:
            out = ACT2FN[activation](out)
        return out.to(t.dtype).transpose(1, 2)  # [B, len, C]

    return per_document(run, spans, x)


def model_function(module: torch.nn.Module, name: str, fallback: str | None = None):
    """The kernel ``name`` the model itself would call: the module's attribute (transformers <= 5.2x set
    the chosen kernel in __init__), else its modeling file's function (later versions dispatch there:
    the hub/FLA kernel when installed, the torch version otherwise), else ``fallback`` there."""
    fn = getattr(module, name, None)
    if callable(fn):
        return fn
    modeling = sys.modules[type(module).__module__]
    for candidate in (name, fallback):
        fn = getattr(modeling, candidate, None) if candidate else None
        if callable(fn):
            return fn
    return None


def require(module: torch.nn.Module, kernel, what: str, packages: str) -> None:
    """ValueError when the model has no ``what`` kernel that runs outside its layer's forward."""
    if kernel is None:
        import transformers

        raise ValueError(
            f"{type(module).__name__}: this transformers ({transformers.__version__}) has no {what} outside the "
            f"layer's forward and {packages} is not installed; ulysses_sp needs one to run it over the full "
            f"sequence: pip install {packages}, or upgrade transformers"
        )
