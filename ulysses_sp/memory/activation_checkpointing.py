"""Activation checkpointing of the decoder layers: what the backward recomputes, and where the
checkpoints live.

Shape legend: B batch, s = S/P local tokens, d hidden size, d_kv key/value width (Nkv * H).
Byte counts are per local token and decoder layer, in bf16.

Policies (:data:`POLICIES`), for every decoder layer (transformers' ``GradientCheckpointingLayer``),
through torch's non-reentrant checkpoint:

* ``"full"``: each layer keeps its input [B, s, d] (2d bytes, 8 KiB for Llama-3-8B) and the
  backward re-runs the whole layer forward first, the attention kernel and both all-to-alls
  included.
* ``"selective"``: the same checkpoints, plus the outputs of the ops in :data:`SAVED_OPS`: the
  attention kernel (SDPA's aten kernels, flash-attn 2/3's and torch's varlen registered ops, the
  flex_attention higher-order op) and the all-to-alls (``_c10d_functional::all_to_all_single``, the
  op under ``all_to_all_single_autograd``). The recomputation then runs neither the attention
  forward nor any all-to-all: per layer and step, 2 all-to-alls in the backward instead of 4.
  Costs 2(3d + 2d_kv) bytes more (q, k, v after the all-to-all, the attention output before and
  after it; 28 KiB for Llama-3-8B) while the layer waits for its backward. A kernel that never
  reaches the dispatcher as one op (eager attention, a compiled flex kernel) is recomputed as
  under "full".
* ``"none"``: nothing is recomputed; every layer keeps all its activations.

Offload (``enable_checkpointing(..., offload=True)``): the layers' checkpoints live in host memory
(offload.py).
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from ..core.wrappers import unwrap
from .offload import offload_layer_inputs, restore_layer_inputs

POLICIES = ("none", "full", "selective")

#: ops whose outputs the selective policy saves (schema names; ``flex_attention`` is a higher-order op).
SAVED_OPS = frozenset(
    {
        "_c10d_functional::all_to_all_single",
        "aten::_scaled_dot_product_flash_attention",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_efficient_attention",
        "aten::_scaled_dot_product_cudnn_attention",
        "aten::_scaled_dot_product_fused_attention_overrideable",
        "torch_attn::_varlen_attn",
        "flash_attn::_flash_attn_forward",
        "flash_attn::_flash_attn_varlen_forward",
        "flash_attn_3::fwd",
        "flex_attention",
    }
)


def op_name(op) -> str:
    """The name :data:`SAVED_OPS` uses for a dispatched op: the schema name of an OpOverload
    (``aten::mm``, overload dropped), the name of a higher-order op."""
    schema = getattr(op, "_schema", None)
    return schema.name if schema is not None else str(op)


def selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective-checkpointing policy: save the outputs of :data:`SAVED_OPS`, recompute the rest."""
    return CheckpointPolicy.MUST_SAVE if op_name(op) in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def resolve_policy(policy: str | bool | None) -> str:
    """A policy name from a policy name, or from the boolean of a ``--grad-ckpt`` switch (True: "full")."""
    if policy is None or policy is False:
        return "none"
    if policy is True:
        return "full"
    if policy not in POLICIES:
        raise ValueError(f"unknown checkpointing policy {policy!r}; choose one of {list(POLICIES)}")
    return policy


def gradient_checkpointing_kwargs(policy: str = "full") -> dict:
    """Keyword arguments of ``torch.utils.checkpoint.checkpoint`` for ``policy`` ("full" or
    "selective"), as transformers' ``gradient_checkpointing_enable(gradient_checkpointing_kwargs=...)``
    (``activation_checkpointing_enable(activation_checkpointing_kwargs=...)``) and
    ``TrainingArguments(gradient_checkpointing_kwargs=...)`` take them."""
    policy = resolve_policy(policy)
    if policy == "none":
        raise ValueError("policy 'none' checkpoints nothing; do not enable gradient checkpointing")
    kwargs = {"use_reentrant": False}
    if policy == "selective":
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, selective_policy)
    return kwargs


def enable_checkpointing(model: torch.nn.Module, policy: str = "full", *, offload: bool = False):
    """Checkpoint every decoder layer of ``model`` (a transformers model, or a PEFT model wrapping
    one: its layers, LoRA adapters included) with ``policy``; with ``offload`` their checkpoints live
    in host memory. Returns ``model``. ``policy="none"`` disables checkpointing (and refuses
    ``offload``, which has nothing to move then)."""
    policy = resolve_policy(policy)
    if policy == "none":
        if offload:
            raise ValueError(
                "offload moves the layers' checkpoints to host memory: it needs policy 'full' or 'selective'"
            )
        return disable_checkpointing(model)
    from ..core.apply import SELECTIVE_WITH_CHUNKS, applied_head_chunks  # transformers: not at flag parsing

    if policy == "selective" and applied_head_chunks(model) > 1:
        raise ValueError(SELECTIVE_WITH_CHUNKS)
    kwargs = gradient_checkpointing_kwargs(policy)
    # the transformers model's own switch, not one a wrapper forwards; non-reentrant checkpoints need
    # no input that requires grad, so frozen embeddings under LoRA are fine
    inner = unwrap(model)
    if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5.2x; gradient_* is deprecated there
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    layers = checkpointed_layers(inner)
    if not layers:
        raise ValueError(f"{type(inner).__name__} has no layer transformers checkpoints (GradientCheckpointingLayer)")
    if offload:
        offload_layer_inputs(layers)
    return model


def disable_checkpointing(model: torch.nn.Module):
    """Undo :func:`enable_checkpointing`: no layer is checkpointed, no offload wrapper is left."""
    inner = unwrap(model)
    layers = checkpointed_layers(inner)
    restore_layer_inputs(layers)
    if layers:
        if hasattr(inner, "activation_checkpointing_disable"):
            inner.activation_checkpointing_disable()
        else:
            inner.gradient_checkpointing_disable()
    return model


def checkpointed_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers of ``model`` that transformers checkpoints now (``GradientCheckpointingLayer``)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [
        m
        for m in model.modules()
        if isinstance(m, GradientCheckpointingLayer)
        and m.gradient_checkpointing
        and hasattr(m, "_gradient_checkpointing_func")
    ]
