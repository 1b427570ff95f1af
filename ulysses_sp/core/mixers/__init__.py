"""Sequence mixers other than softmax attention (linear attention, SSM scans, short convolutions)
under Ulysses SP: one module per mixer kind, each with

- ``CLASSES``: the transformers module classes it runs (matched by name, so a model's own copy of a
  mixer is never confused with another family's);
- ``READS``: the module attributes its forward reads (a transformers version that renamed one is
  refused by :func:`patch`, before anything changes);
- ``make_context(module, topology)``: the head plan, refusing shapes SP cannot split (before any
  collective);
- ``forward(module, ctx, hidden_states, ...)``: the layer on the local shard.

:func:`patch` sets that forward on the mixer instances of one model (an instance attribute: other
models of the same class are untouched) and returns what undoes it.

The step's document layout reaches a mixer as the SequenceInfo keyword of the model call when its
decoder layer passes keywords down, else through :class:`Patched` (see :func:`common.begin`):
a mixer that ran without it would carry its state across packed documents, silently.
"""

from __future__ import annotations

import functools

import torch
import transformers

from ..sequence_info import SequenceInfo
from ..topology import SPTopology
from . import gated_delta, kimi_delta, lightning, mamba1, mamba2, short_conv

KINDS = (gated_delta, kimi_delta, lightning, short_conv, mamba2, mamba1)


def _kind(module: torch.nn.Module):
    name = type(module).__name__
    return next((kind for kind in KINDS if name in kind.CLASSES), None)


def find(model: torch.nn.Module) -> list[tuple[torch.nn.Module, object]]:
    """(module, kind) of every mixer of ``model`` that runs under SP here."""
    return [(m, kind) for m in model.modules() if (kind := _kind(m)) is not None]


class Patched:
    """The mixers of one model under SP: ``info`` is the step's SequenceInfo, set by apply's pre-hook on
    every model call, read by a mixer whose decoder layer does not pass the call's keyword arguments
    down (Jamba); ``restore()`` puts every mixer's own forward back."""

    def __init__(self, modules: list[torch.nn.Module]):
        self.modules = modules
        self.info: SequenceInfo | None = None

    def restore(self) -> None:
        for module in self.modules:
            del module.forward  # the class's forward again


def patch(model: torch.nn.Module, topology: SPTopology) -> Patched:
    """Run every mixer of ``model`` under SP. Every mixer's head plan is made first, so a shape SP cannot
    split raises before anything changes."""
    for module, kind in find(model):
        missing = [name for name in kind.READS if not hasattr(module, name)]
        if missing:
            raise ValueError(
                f"{type(module).__name__} of this transformers ({transformers.__version__}) has no {missing}, which "
                f"ulysses_sp's forward for it reads ({kind.__name__}); use a transformers version it supports "
                "(docs/hybrid-models.md) or train without sequence parallelism"
            )
    found = [(m, kind, kind.make_context(m, topology)) for m, kind in find(model)]
    patched = Patched([m for m, _, _ in found])
    for module, kind, ctx in found:
        ctx.step = patched
        module.forward = functools.partial(kind.forward, module, ctx)
    return patched
