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

The module's hooks stay outside the compiled region, as torchtitan orders checkpointing, compile and
FSDP2: FSDP2's unshard/reshard hooks are ``torch._dynamo.disable``d, and such a call inside a
checkpoint makes dynamo run the whole checkpoint eagerly (FSDP2 + compile then gained nothing on an
H100). ``layer.compile`` runs the hooks before the compiled frame. For a checkpointed layer,
transformers 5.17 checkpoints ``GradientCheckpointingLayer.__call__``, hooks included (later releases
checkpoint ``forward``): :class:`CheckpointedForward` puts the compiled checkpoint into the layer's
``forward`` (an instance attribute) and the layer's checkpoint function only calls through, so on
every transformers release the hooks run eagerly before the compiled checkpoint.

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

import functools

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


class CheckpointedForward:
    """A compiled layer's forward, run inside its checkpoint function (module docstring):
    ``checkpoint_fn(forward, *args)`` while the layer trains with gradients, the plain forward
    otherwise (as transformers' own checkpointing does)."""

    def __init__(self, layer: torch.nn.Module, checkpoint_fn):
        self.layer, self.checkpoint_fn = layer, checkpoint_fn
        self.replaced = layer.__dict__.get("forward")  # another feature's instance forward, restored after
        self.forward = layer.forward  # bound: that one or the class's

    def __call__(self, *args, **kwargs):
        if self.layer.training and torch.is_grad_enabled():
            return self.checkpoint_fn(functools.partial(self.forward, **kwargs), *args)
        return self.forward(*args, **kwargs)


def _call_through(function, *args, **kwargs):
    """The checkpoint function of a layer with a :class:`CheckpointedForward`: ``function`` is the
    layer's ``Module.__call__`` (its hooks, then the checkpointed forward)."""
    return function(*args, **kwargs)


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
            fn = CompiledCheckpoint(fn, backend, mode)
        layer.forward = CheckpointedForward(layer, fn)
        layer._gradient_checkpointing_func = _call_through
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
        forward = layer.__dict__.get("forward")
        if isinstance(forward, CheckpointedForward):
            layer._gradient_checkpointing_func = forward.checkpoint_fn
            if forward.replaced is None:
                del layer.forward
            else:
                layer.forward = forward.replaced
        fn = getattr(layer, "_gradient_checkpointing_func", None)
        if isinstance(fn, OffloadLayerInput) and isinstance(fn.checkpoint_fn, CompiledCheckpoint):
            fn.checkpoint_fn = fn.checkpoint_fn.original
        elif isinstance(fn, CompiledCheckpoint):
            layer._gradient_checkpointing_func = fn.original
    del inner._ulysses_sp_compiled
    return model
