"""Causal-LM loss on the local shard of an SP group, normalised by a global count of tokens.

Shape legend: B batch, s = S/P local tokens, S full (padded) sequence, P sp_size, D hidden size,
V vocabulary, T = B*s local tokens flattened.

Convention (docs/loss.md has the derivation):

* :func:`causal_lm_loss` returns ``L = (sum of CE over every labelled token of the SP group's
  sequences) / n``, the same value on every rank of the group. ``n`` is ``num_items_in_batch``, by
  default the labelled tokens of this micro-batch over the group. The local CE sum goes through a
  differentiable sum all-reduce over the SP group, whose backward sums the upstream gradients of the
  P ranks; so the parameter gradients of one SP group sum to **P x** dL/dtheta. An engine that
  averages gradients over all world ranks (DDP on the world group, DeepSpeed with
  ``sequence_parallel_size``: both divide by dp*P) cancels the P exactly.
* With data parallelism and/or gradient accumulation pass ``n = count_label_tokens(step, topology)``
  = N / dp, N being the labelled tokens of the whole step (every micro-batch of every DP replica).
  After summing the micro-batches and averaging over the world, the gradient is that of
  ``sum(CE over the step) / N``: what one process running the whole step would compute.
* A micro-batch without any labelled token (over the group) gives a loss of 0 whose gradients are 0
  (never NaN). An explicit ``num_items_in_batch <= 0`` is an error.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from ..core import comm
from ..core.apply import is_applied
from ..core.sequence_info import SEQ_INFO_KWARG
from ..core.sharding import input_tokens
from ..core.topology import SPTopology
from ..core.wrappers import check_adapters, unwrap
from .logits import LogitTransform, logit_transform
from .tiled_ce import (
    DEFAULT_FULL_LOGITS_BYTES,
    DEFAULT_TILE_BYTES,
    IGNORE_INDEX,
    choose_loss_path,
    fits_full,
    liger_cross_entropy_sum,
    liger_unsupported_reason,
    tile_tokens_for_budget,
    tiled_cross_entropy_sum,
)


def _labels_of(batch: Mapping, sp_size: int) -> torch.Tensor:
    """The local ``shift_labels`` [B, s], checked against the inputs' shape: the shard's [B, s], or a
    vision-language model's whole sample [B, s*P] described by the batch's SequenceInfo
    (``shard_batch(..., vlm=True)``)."""
    if not isinstance(batch, Mapping):
        raise ValueError(f"the local batch must be a dict of tensors, got {type(batch).__name__}")
    labels = batch.get("shift_labels")
    if labels is None:
        hint = (
            (
                " It has `labels`: labels must be shifted on the full sequence before sharding "
                "(a shard's last token is labelled with the next shard's first), so use "
                "ulysses_sp.shard_batch."
            )
            if "labels" in batch
            else ""
        )
        raise ValueError(f"the local batch has no `shift_labels` [B, S/P].{hint}")
    tokens = input_tokens(batch, "the local batch")
    B, n = tokens.shape[:2]
    info = batch.get(SEQ_INFO_KWARG)
    local = n // sp_size if info is not None and n == info.seq_len and n % sp_size == 0 else n  # a VLM's sample
    if labels.dim() != 2 or tuple(labels.shape) != (B, local):
        raise ValueError(f"shift_labels must have the local tokens' shape {[B, local]}, got {list(labels.shape)}")
    return labels


def _check_count(n) -> None:
    if torch.is_tensor(n) and n.numel() != 1:
        raise ValueError(f"num_items_in_batch must be a scalar, got shape {list(n.shape)}")
    if torch.is_tensor(n) and n.dtype in (torch.bfloat16, torch.float16):
        # seen where a mixed-precision wrapper casts every float input of the loss module: bf16 rounds
        # a count above 256 (8188 -> 8192), silently scaling the loss and every gradient
        raise ValueError(
            f"num_items_in_batch arrived as a {n.dtype} tensor ({float(n)}), which cannot hold a token count "
            "exactly; pass it as an integer or float32/float64 tensor, and keep mixed-precision wrappers "
            "(FSDP2's MixedPrecisionPolicy(cast_forward_inputs=...), autocast of inputs) from casting it"
        )
    value = float(n) if not torch.is_tensor(n) else float(n.detach().reshape(()))  # one host sync
    if not value > 0:
        raise ValueError(
            f"num_items_in_batch must be > 0 (it divides the summed loss), got {value}; "
            "a step without labelled tokens should be skipped, or pass None"
        )


def causal_lm_loss(
    model: torch.nn.Module,
    local_batch: Mapping[str, torch.Tensor],
    topology: SPTopology,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    *,
    tile_tokens: int | None = None,
    tile_bytes: int = DEFAULT_TILE_BYTES,
    use_liger: bool | None = None,
    head_loss: torch.nn.Module | None = None,
    full_logits_bytes: int = DEFAULT_FULL_LOGITS_BYTES,
) -> torch.Tensor:
    """Next-token CE of the SP group's sequences / ``num_items_in_batch``; a 0-dim fp32 tensor,
    equal on every rank of the group (see the module docstring for the gradient convention).

    ``model``: a causal LM, or a PEFT model wrapping one (its LoRA adapters run inside the backbone
    and the head; core/wrappers.py). ``local_batch``: this rank's shard, ``input_ids`` [B, s],
    ``position_ids`` [B, s] (global), ``shift_labels`` [B, s] (-100 ignored), optionally
    ``ulysses_sp_info`` and other model inputs; every key but ``shift_labels`` / ``labels`` goes to
    the backbone (the causal LM's ``base_model``). A vision-language model's batch from
    ``shard_batch(..., vlm=True)`` holds the whole sample's inputs [B, S] and the shard's labels.
    The path (tiled_ce.choose_loss_path): when the shard's fp32 logits fit ``full_logits_bytes``
    they are computed in one piece and kept for the backward, as plain transformers does ("full"; 0
    turns it off, and so does an explicit ``tile_tokens``); above it liger-kernel's fused loss when
    it can run (CUDA, installed, plain Linear head) and ``use_liger`` is None, else the torch path
    over tiles of ``tile_tokens`` tokens (default: ``tile_bytes`` of fp32 logits per tile), each
    recomputed in the backward.
    ``use_liger=True`` requires liger at every size, False never uses it. ``head_loss``: a
    :class:`HeadLoss` to run the head and the cross-entropy in (:class:`CausalLMLoss` passes its own).
    """
    if num_items_in_batch is not None:
        _check_count(num_items_in_batch)
    hidden, flat_labels, head, transform = shard_hidden_states(model, local_batch, topology)  # [T, D], [T]

    vocab = vocab_size(model)
    tile = tile_tokens if tile_tokens is not None else tile_tokens_for_budget(vocab, tile_bytes)
    # tiles asked for by size are tiles: the full path is the default's choice only
    full = use_liger is not True and tile_tokens is None and fits_full(hidden.shape[0], vocab, full_logits_bytes)
    head_ce = head_loss if head_loss is not None else head_cross_entropy_sum
    ce_sum = head_ce(hidden, flat_labels, head, transform, tile, use_liger, full)  # scalar fp32

    if topology.sp_size > 1:
        ce_sum = comm.all_reduce_autograd_sum(ce_sum, topology.sp_group)
    if num_items_in_batch is None:
        count = (flat_labels != IGNORE_INDEX).sum()
        if topology.sp_size > 1:
            count = comm.all_reduce(count, topology.sp_group)
        n = count.clamp(min=1).to(torch.float32)
    else:
        n = torch.as_tensor(num_items_in_batch, device=ce_sum.device).to(torch.float32).reshape(())
    return ce_sum / n


def shard_hidden_states(model: torch.nn.Module, local_batch: Mapping[str, torch.Tensor], topology: SPTopology):
    """The backbone's last hidden states of this rank's shard and what turns them into next-token
    logits: ``(hidden [T, D], shift_labels [T], head, LogitTransform)``, T = B*s. Every key of
    ``local_batch`` but the labels goes to the backbone (the causal LM's ``base_model``); a PEFT
    wrapper is seen through to the causal LM inside it, whose head may itself carry a LoRA adapter
    (the head is called as a module, so the adapter is applied)."""
    labels = _labels_of(local_batch, topology.sp_size)
    check_adapters(model, local_batch)
    if topology.sp_size > 1 and not is_applied(model):
        raise ValueError("the model runs on a shard of the sequence: call ulysses_sp.apply(model, topology) first")
    lm = unwrap(model)
    backbone, head = lm.base_model, lm.get_output_embeddings()
    if backbone is lm or head is None:
        raise ValueError(
            f"{type(lm).__name__} is not a causal LM with a backbone and an output head "
            "(e.g. LlamaForCausalLM); the sharded loss needs both"
        )
    transform = logit_transform(lm)
    inputs = {k: v for k, v in local_batch.items() if k not in ("shift_labels", "labels")}
    inputs.setdefault("use_cache", False)
    hidden = backbone(**inputs)[0]  # [B, s, D]
    return hidden.flatten(0, 1), labels.flatten().to(hidden.device), head, transform  # [T, D], [T]


def vocab_size(model: torch.nn.Module) -> int:
    lm = unwrap(model)
    head = lm.get_output_embeddings()
    return getattr(head, "out_features", None) or lm.config.get_text_config(decoder=True).vocab_size


def planned_loss_path(
    model: torch.nn.Module,
    tokens: int,
    device: torch.device,
    use_liger: bool | None = None,
    full_logits_bytes: int = DEFAULT_FULL_LOGITS_BYTES,
) -> str:
    """The path (tiled_ce.LOSS_PATHS) :func:`causal_lm_loss` takes for ``tokens`` local tokens on
    ``device`` with these settings, the engine making the head's weight available to the loss."""
    lm = unwrap(model)
    reason = (
        "disabled"
        if use_liger is False
        else liger_unsupported_reason(
            torch.empty(0, device=device), lm.get_output_embeddings(), logit_transform(lm), check_weight=False
        )
    )
    return choose_loss_path(fits_full(tokens, vocab_size(model), full_logits_bytes), reason, use_liger)


def head_cross_entropy_sum(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head,
    transform: LogitTransform,
    tile_tokens: int,
    use_liger: bool | None,
    full: bool = False,
) -> torch.Tensor:
    """Sum of CE(transform(head(hidden)), labels) over the labelled tokens, on the path
    :func:`causal_lm_loss` describes: ``full`` (the logits in one piece, kept), liger's fused kernel, or
    the torch path with ``tile_tokens`` per tile. hidden [T, D], labels [T]; a 0-dim fp32 tensor."""
    if full and not use_liger:  # chosen by size in causal_lm_loss
        return tiled_cross_entropy_sum(hidden, labels, head, max(1, hidden.shape[0]), transform, recompute=False)
    reason = liger_unsupported_reason(hidden, head, transform) if use_liger is not False else "disabled"
    if choose_loss_path(False, reason, use_liger) == "liger":
        return liger_cross_entropy_sum(hidden, labels, head, transform)
    return tiled_cross_entropy_sum(hidden, labels, head, tile_tokens, transform)


class HeadLoss(torch.nn.Module):
    """:func:`head_cross_entropy_sum` as a module of its own, without parameters.

    Under ZeRO-3 ``integrations.deepspeed.initialize`` registers the head's weight as an external
    parameter of this module (the fused kernel reads the weight, not the module), so ZeRO-3 gathers
    it around the loss only: this module's forward and its backward. Registered on the whole
    :class:`CausalLMLoss` instead, the full head (V x D, 0.98 GiB in bf16 for Llama-3-8B) would stay
    gathered through every decoder layer's forward and backward.
    """

    def forward(self, hidden, labels, head, transform, tile_tokens, use_liger, full=False):
        return head_cross_entropy_sum(hidden, labels, head, transform, tile_tokens, use_liger, full)


def count_label_tokens(local_batches: Mapping | Iterable[Mapping], topology: SPTopology) -> torch.Tensor:
    """N / dp_size for one optimiser step: N = labelled tokens over every micro-batch of every DP
    replica (``local_batches`` = this rank's shards of the step's micro-batches, or one batch).

    One sum all-reduce over the world: the shards of a sequence partition its tokens, so summing
    every rank's local count counts each token once. Pass the result as ``num_items_in_batch`` to
    every micro-batch's :func:`causal_lm_loss`. Returns a 0-dim float64 tensor (0 if N == 0).
    """
    batches = [local_batches] if isinstance(local_batches, Mapping) else list(local_batches)
    if not batches:
        raise ValueError("count_label_tokens needs the step's micro-batches, got none")
    counts = [(_labels_of(b, topology.sp_size) != IGNORE_INDEX).sum() for b in batches]
    local = torch.stack(counts).sum().to(torch.int64)
    if comm.world_size() != topology.world_size:
        raise ValueError(f"the topology spans {topology.world_size} ranks but the world has {comm.world_size()}")
    total = comm.all_reduce(local, None) if topology.world_size > 1 else local
    return total.to(torch.float64) / topology.dp_size


def reduce_loss_for_logging(step_losses: Iterable[torch.Tensor], topology: SPTopology) -> torch.Tensor:
    """Global token-mean loss of a step from its micro-batch losses (each normalised with
    :func:`count_label_tokens`): their sum, averaged over the DP replicas. Detached fp32, equal on
    every rank. (With one micro-batch and dp == 1 any normalisation works: the loss is returned.)"""
    losses = [loss.detach().float().reshape(()) for loss in step_losses]
    if not losses:
        raise ValueError("reduce_loss_for_logging needs at least one loss")
    total = torch.stack(losses).sum()
    if topology.dp_size > 1:
        total = comm.all_reduce(total, topology.dp_group)
    return total / topology.dp_size


class CausalLMLoss(torch.nn.Module):
    """``model`` whose forward returns :func:`causal_lm_loss`: the module to hand to an engine
    (``DistributedDataParallel``, ``deepspeed.initialize``), so the loss runs inside the engine's
    forward (DDP prepares its gradient reduction there). ``loss = engine(local_batch, n)``."""

    def __init__(self, model: torch.nn.Module, topology: SPTopology, **loss_kwargs):
        super().__init__()
        self.model = model
        self.head_loss = HeadLoss()
        self.topology = topology
        self.loss_kwargs = loss_kwargs

    def forward(self, local_batch: Mapping[str, torch.Tensor], num_items_in_batch=None) -> torch.Tensor:
        return causal_lm_loss(
            self.model, local_batch, self.topology, num_items_in_batch, head_loss=self.head_loss, **self.loss_kwargs
        )
