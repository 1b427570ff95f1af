"""One optimizer step's micro-batches: each loss normalised by the labelled tokens of the whole step.

The run loop (train/loop.py) and Accelerate's :func:`~ulysses_sp.integrations.accelerate.train_step`
share this; SPTrainer gets the same normalisation from the Trainer's ``num_items_in_batch``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from ..core.rng import sharded_rng
from ..core.topology import SPTopology
from .causal_lm import count_label_tokens, reduce_loss_for_logging

#: ``forward_backward(local_batch, num_items, is_last) -> loss``: one micro-batch's forward and backward
ForwardBackward = Callable[[Mapping, torch.Tensor, bool], torch.Tensor]


def accumulate_step(
    micro_batches: Sequence[Mapping],
    topology: SPTopology,
    forward_backward: ForwardBackward,
    num_items: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run ``forward_backward`` on this rank's shards of the step's micro-batches and return the step's
    loss (global token mean over every micro-batch and DP replica, the same on every rank).

    ``num_items`` (default :func:`~ulysses_sp.count_label_tokens` of ``micro_batches``) is passed to
    every micro-batch, so the accumulated, world-averaged gradient is the non-SP reference's. Each
    micro-batch runs inside :func:`~ulysses_sp.sharded_rng` (dropout differs per SP rank).
    """
    if not micro_batches:
        raise ValueError("a step needs at least one micro-batch")
    if num_items is None:
        num_items = count_label_tokens(micro_batches, topology)
    losses = []
    for i, batch in enumerate(micro_batches):
        with sharded_rng(topology):
            losses.append(forward_backward(batch, num_items, i == len(micro_batches) - 1).detach())
    return reduce_loss_for_logging(losses, topology)
