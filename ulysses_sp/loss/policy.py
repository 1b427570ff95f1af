"""Policy-gradient losses on the local shard (PPO / GRPO / DAPO / Dr. GRPO), normalised over the step.

Shape legend: B sequences (rows) of the micro-batch, s = S/P local tokens, P = sp_size.

Per token (``mask``: the completion tokens that count), with ``r = exp(logp - old_logp)`` and the
advantage ``A``: ``-min(r A, clip(r, 1 - eps, 1 + eps_high) A)``, plus ``kl_coef * KL`` with the k3
estimator ``exp(ref - logp) - (ref - logp) - 1`` against a reference model. Without
``old_logprobs`` the update is on-policy: ``r`` is 1 with the gradient of ``logp``.

How the tokens' terms become one number (``loss_type``), over every token of the step, whatever
rank, micro-batch or DP replica holds it (docs/loss.md):

* ``"token_mean"`` (DAPO): the sum over all completion tokens / their count;
* ``"sequence_mean"`` (GRPO): each sequence's mean over its tokens, averaged over the sequences;
* ``"sequence_sum"`` (Dr. GRPO): the sum over all tokens / (sequences x ``max_length``), a constant
  that does not favour short or long answers.

A sequence's tokens are spread over the P ranks of its SP group: its token count is summed over the
group. The gradient convention is :func:`ulysses_sp.causal_lm_loss`'s: the local sum goes through a
differentiable all-reduce over the SP group, so each rank returns the group's loss and the engine's
average over all dp x P ranks gives the reference gradient. Over several micro-batches or DP
replicas pass ``num_items`` from :func:`count_policy_items` of the step (as ``count_label_tokens``
for the CE loss); by default each micro-batch normalises by its own tokens or sequences.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..core import comm
from ..core.topology import SPTopology

LOSS_TYPES = ("token_mean", "sequence_mean", "sequence_sum")


def _group_row_counts(mask: torch.Tensor, topology: SPTopology) -> torch.Tensor:
    """Tokens of each row over the SP group: [B] (the group's ranks hold the same rows)."""
    counts = mask.sum(1).to(torch.float64)  # [B]
    return comm.all_reduce(counts, topology.sp_group) if topology.sp_size > 1 else counts


def count_policy_items(masks: torch.Tensor | Iterable[torch.Tensor], topology: SPTopology, loss_type: str):
    """``num_items`` for :func:`policy_loss` over a whole step: N / dp, N = the completion tokens
    ("token_mean") or the sequences with at least one ("sequence_mean", "sequence_sum") of every
    micro-batch of every DP replica. ``masks``: this rank's [B, s] masks of the step's micro-batches.
    A collective (the world for tokens, the SP and DP groups for sequences)."""
    _check_type(loss_type)
    masks = [masks] if isinstance(masks, torch.Tensor) else list(masks)
    if not masks:
        raise ValueError("count_policy_items needs the step's micro-batch masks, got none")
    if loss_type == "token_mean":
        local = torch.stack([m.sum() for m in masks]).sum().to(torch.float64)
        total = comm.all_reduce(local, None) if topology.world_size > 1 else local  # shards partition tokens
    else:
        local = torch.stack([(_group_row_counts(m, topology) > 0).sum() for m in masks]).sum().to(torch.float64)
        total = comm.all_reduce(local, topology.dp_group) if topology.dp_size > 1 else local  # one per group
    return total / topology.dp_size


def policy_loss(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    topology: SPTopology,
    *,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    loss_type: str = "token_mean",
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    kl_coef: float = 0.0,
    max_length: int | None = None,
    num_items: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """The clipped policy-gradient loss of this rank's shard, normalised over the step (module
    docstring); a 0-dim fp32 tensor, equal on every rank of the SP group.

    ``logprobs`` [B, s]: :func:`ulysses_sp.token_logprobs` of the policy (with gradients);
    ``advantages`` [B, s] or [B, 1]; ``mask`` [B, s] (bool or 0/1: the tokens that count);
    ``old_logprobs`` / ``ref_logprobs`` [B, s]: the sampling policy's and the reference model's.
    ``clip_eps_high`` (DAPO's clip-higher) defaults to ``clip_eps``. ``max_length``: the constant of
    "sequence_sum" (the longest completion allowed). A step without any token gives 0 (never NaN).
    """
    _check_type(loss_type)
    if logprobs.dim() != 2 or mask.shape != logprobs.shape:
        raise ValueError(
            f"logprobs and mask must be [B, s] of the same shape, got {list(logprobs.shape)} and {list(mask.shape)}"
        )
    if loss_type == "sequence_sum" and not (isinstance(max_length, int) and max_length > 0):
        raise ValueError(
            f"loss_type 'sequence_sum' divides by sequences x max_length: give max_length > 0 (the "
            f"longest completion allowed), got {max_length!r}"
        )
    if kl_coef and ref_logprobs is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logprobs (the reference model's token log-probs)")
    mask = mask.to(logprobs.dtype)
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    ratio = torch.exp(logprobs - old)  # [B, s]
    high = clip_eps if clip_eps_high is None else clip_eps_high
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + high)
    per_token = -torch.minimum(ratio * advantages, clipped * advantages)  # [B, s]
    if kl_coef:
        delta = ref_logprobs - logprobs
        per_token = per_token + kl_coef * (torch.exp(delta) - delta - 1)  # k3: unbiased, >= 0
    per_token = per_token * mask
    if loss_type == "sequence_mean":
        rows = _group_row_counts(mask, topology)  # [B]
        local = (per_token.sum(1) / rows.clamp(min=1).to(per_token.dtype)).sum()
    else:
        local = per_token.sum()
    if topology.sp_size > 1:
        local = comm.all_reduce_autograd_sum(local, topology.sp_group)
    if num_items is None:
        if loss_type == "token_mean":
            n = _group_row_counts(mask, topology).sum()
        else:
            n = (_group_row_counts(mask, topology) > 0).sum().to(torch.float64)
    else:
        n = torch.as_tensor(num_items, dtype=torch.float64, device=logprobs.device)
    if loss_type == "sequence_sum":
        n = n * max_length
    return local.float() / n.clamp(min=1).to(device=local.device, dtype=torch.float32)


def _check_type(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {list(LOSS_TYPES)}")
