"""Sequence mixers other than softmax attention (linear attention, SSM scans, short convolutions)
under Ulysses SP: one module per mixer kind, each with

- ``CLASSES``: the transformers module classes it runs (matched by name, so a model's own copy of a
  mixer is never confused with another family's);
- ``make_context(module, topology)``: the head plan, refusing shapes SP cannot split (before any
  collective);
- ``forward(module, ctx, hidden_states, ...)``: the layer on the local shard.

:func:`patch` sets that forward on the mixer instances of one model (an instance attribute: other
models of the same class are untouched) and returns what undoes it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from ..topology import SPTopology
from . import gated_delta, mamba2, short_conv

KINDS = (gated_delta, short_conv, mamba2)


def _kind(module: torch.nn.Module):
    name = type(module).__name__
    return next((kind for kind in KINDS if name in kind.CLASSES), None)


def find(model: torch.nn.Module) -> list[tuple[torch.nn.Module, object]]:
    """(module, kind) of every mixer of ``model`` that runs under SP here."""
    return [(m, kind) for m in model.modules() if (kind := _kind(m)) is not None]


def patch(model: torch.nn.Module, topology: SPTopology) -> Callable[[], None]:
    """Run every mixer of ``model`` under SP; returns the function that restores them. Every mixer's
    head plan is made first, so a shape SP cannot split raises before anything changes."""
    found = [(m, kind, kind.make_context(m, topology)) for m, kind in find(model)]
    for module, kind, ctx in found:
        module.forward = functools.partial(kind.forward, module, ctx)

    def restore() -> None:
        for module, _, _ in found:
            del module.forward  # the class's forward again

    return restore
