"""torch.compile of each decoder layer, composed with the memory features and Ulysses attention.

What is compiled, per decoder layer (transformers' ``GradientCheckpointingLayer``):

* a checkpointed layer: its checkpoint function (``layer._gradient_checkpointing_func``, the
  ``torch.utils.checkpoint`` call transformers makes around the layer's forward). Dynamo then traces
  the checkpoint as one region with the layer inside, so a selective policy still sees every op and
  saves the attention kernel's and the all-to-alls' outputs, and Inductor fuses the elementwise work
  (norms, RoPE, SiLU * mul, residual adds, casts) of the forward and of the recomputation. With
  offload the compiled function is the one inside the offload wrapper: ``saved_tensors_hooks``
  cannot be traced, and from outside they still see the layer input the compiled checkpoint saves.
* a layer without checkpointing: the module itself (``layer.compile``).

Per layer rather than the whole model: one graph serves every layer (same shapes and code), so the
compile time does not grow with depth, and the backbone's per-step work (masks, the SP pre-hook)
stays eager.

Dynamo must not replay the forward's Python side effects in the recomputation: transformers'
kernel registry (``kernels``) sets a context variable inside the attention forward, which the
checkpoint region would otherwise refuse (a graph break that leaves the whole layer eager). The
compiled call runs with ``skip_fwd_side_effects_in_bwd_under_checkpoint``: tensors are still
recomputed, only such Python state writes are not repeated.

The tiled MLP (tiled_mlp.py) compiles as one checkpoint per tile; a norm with the RMSNorm recompute
runs its plain ops in the compiled region (Inductor fuses them and keeps only what the backward
needs), and liger's fused ops (fused_ops.py) take their torch path while traced.
"""

from __future__ import annotations

import torch

from ..core.wrappers import unwrap
from .activation_checkpointing import checkpointed_layers
from .offload import OffloadLayerInput

BACKENDS = ("inductor", "aot_eager", "eager")


class CompiledCheckpoint:
    """A layer's checkpoint function compiled; ``original`` is what it replaced."""

    def __init__(self, original, backend: str, mode: str | None):
        self.original = original
        self.compiled = torch.compile(original, backend=backend, mode=mode)

    def __call__(self, *args, **kwargs):
        with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
            return self.compiled(*args, **kwargs)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in unwrap(model).modules() if isinstance(m, GradientCheckpointingLayer)]


def is_compiled(model: torch.nn.Module) -> bool:
    return getattr(unwrap(model), "_ulysses_sp_compiled", None) is not None


def compile_layers(model: torch.nn.Module, *, backend: str = "inductor", mode: str | None = None):
    """Compile every decoder layer of ``model`` (a transformers model, or a PEFT model wrapping one)
    with ``torch.compile(backend=backend, mode=mode)``; returns ``model``.

    Call it last: after :func:`ulysses_sp.apply` and the memory features (checkpointing, offload,
    tiled MLP, norm recompute), before the engine wraps the model. :func:`uncompile_layers` undoes it
    (and must come before changing those features again).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown compile backend {backend!r}; use one of {list(BACKENDS)}")
    inner = unwrap(model)
    if is_compiled(inner):
        raise ValueError("the layers of this model are already compiled; call uncompile_layers(model) first")
    layers = decoder_layers(inner)
    if not layers:
        raise ValueError(f"{type(inner).__name__} has no decoder layers (transformers' GradientCheckpointingLayer)")
    checkpointed = {id(m) for m in checkpointed_layers(inner)}
    for layer in layers:
        if id(layer) not in checkpointed:
            layer.compile(backend=backend, mode=mode)
            continue
        fn = layer._gradient_checkpointing_func
        if isinstance(fn, OffloadLayerInput):
            fn.checkpoint_fn = CompiledCheckpoint(fn.checkpoint_fn, backend, mode)
        else:
            layer._gradient_checkpointing_func = CompiledCheckpoint(fn, backend, mode)
    inner._ulysses_sp_compiled = layers
    return model


def uncompile_layers(model: torch.nn.Module):
    """Undo :func:`compile_layers`: every layer runs eagerly again."""
    inner = unwrap(model)
    layers = getattr(inner, "_ulysses_sp_compiled", None)
    if layers is None:
        raise ValueError("the layers of this model are not compiled")
    for layer in layers:
        layer._compiled_call_impl = None
        fn = getattr(layer, "_gradient_checkpointing_func", None)
        if isinstance(fn, OffloadLayerInput) and isinstance(fn.checkpoint_fn, CompiledCheckpoint):
            fn.checkpoint_fn = fn.checkpoint_fn.original
        elif isinstance(fn, CompiledCheckpoint):
            layer._gradient_checkpointing_func = fn.original
    del inner._ulysses_sp_compiled
    return model
