"""SPSFTTrainer: TRL's ``SFTTrainer`` with Ulysses SP, packing included.

    trainer = SPSFTTrainer(model=model, args=SFTConfig(..., packing=True), train_dataset=...,
                           processing_class=tokenizer, sp_size=2)

Import this module only where TRL is installed (``pip install trl``; it is not a dependency of
ulysses_sp). Tested with trl 1.16 and transformers 5.25, under DDP and in one process
(tests/distributed/integrations/test_trl.py).

What it is: :class:`~ulysses_sp.integrations.hf_trainer.SPTrainer` (data keyed by DP rank, every
batch sharded with ``shard_batch``, the sharded loss, evaluation under SP) in front of
``SFTTrainer`` in the method order, so SFTTrainer prepares the data (tokenising, completion /
assistant masks as ``-100`` labels, packing) and SPTrainer trains on it: the logged losses are
stock SFTTrainer's (the algebra is SPTrainer's, see its module docstring).

* **Packing.** ``packing=True`` (``packing_strategy="bfd"``, padding-free) makes SFTTrainer's
  collator flatten a batch into one row with ``position_ids`` restarting at every document and
  ``cu_seq_lens_q``. ``shard_batch`` reads both: the SequenceInfo keeps each document's attention to
  itself, positions stay per document, and no document's last token is trained on the next one's
  first. Without packing, the collator's right-padded ``attention_mask`` is read as padding.
* **Masks.** ``completion_only_loss`` and ``assistant_only_loss`` only turn labels into ``-100``
  before collation, so they hold unchanged.
* **Metrics.** SFTTrainer logs ``entropy``, ``mean_token_accuracy`` and ``num_tokens`` from its
  fused LM head, which SP does not run. Here the head module of the sharded loss also sums, without
  gradients and tile by tile (no ``[T, V]`` logits), the entropy and the top-1 hits of every
  labelled token of the shard; one sum all-reduce over all ranks counts every token once, so the
  values are stock SFTTrainer's. That costs one more forward of the head over the labelled tokens.
  ``num_tokens`` is counted on the full batches before sharding, once per SP group.

Refused with one ValueError (besides SPTrainer's refusals): ``loss_type="dft"``, the MoE
load-balancing loss (``router_aux_loss_coef`` > 0 on a MoE model), vision datasets. LoRA adapters
(``peft_config`` or a PEFT model) train as under SPTrainer (docs/lora.md).
"""

from __future__ import annotations

import torch
from trl import SFTTrainer

from ..core import comm
from ..loss.causal_lm import HeadLoss
from ..loss.logits import LogitTransform
from ..loss.tiled_ce import IGNORE_INDEX
from .hf_trainer import SPTrainer


@torch.no_grad()
def token_statistics(
    hidden: torch.Tensor, labels: torch.Tensor, head, transform: LogitTransform, tile_tokens: int
) -> torch.Tensor:
    """Sums over the labelled tokens of hidden [T, D] / labels [T]: ``[entropy, top-1 hits, count]``,
    fp64 [3]. The head runs on ``tile_tokens`` labelled tokens at a time ([t, V] fp32 logits per
    tile); a hit is a label equal to the first argmax, as SFTTrainer counts ``mean_token_accuracy``."""
    keep = labels != IGNORE_INDEX
    sums = torch.zeros(3, dtype=torch.float64, device=hidden.device)
    for h, y in zip(hidden[keep].split(tile_tokens), labels[keep].split(tile_tokens)):  # [t, D], [t]
        logp = torch.log_softmax(transform(head(h)).float(), dim=-1)  # [t, V]
        sums[0] += -(logp.exp() * logp).sum()
        sums[1] += (logp.argmax(-1) == y).sum()
    sums[2] = keep.sum()
    return sums


class TokenStatisticsHeadLoss(HeadLoss):
    """:class:`HeadLoss` that also keeps :func:`token_statistics` of its last call in ``sums``
    (this rank's shard; the loss and its gradient are HeadLoss's)."""

    def __init__(self):
        super().__init__()
        self.sums: torch.Tensor | None = None  # [3] fp64

    def forward(self, hidden, labels, head, transform, tile_tokens, use_liger, full=False):
        self.sums = token_statistics(hidden.detach(), labels, head, transform, tile_tokens)
        return super().forward(hidden, labels, head, transform, tile_tokens, use_liger, full)


def sft_token_count(batch: dict) -> int:
    """Tokens of one full collated batch as SFTTrainer's ``num_tokens`` counts them: the attention
    mask's ones, else (padding-free: one flattened row) the row's length."""
    if batch.get("attention_mask") is not None:
        return int(batch["attention_mask"].sum())
    if batch.get("position_ids") is not None:
        return batch["position_ids"].shape[-1]
    raise ValueError(f"expected 'attention_mask' or 'position_ids' in an SFT batch, got keys {sorted(batch)}")


class SPSFTTrainer(SPTrainer, SFTTrainer):
    """``trl.SFTTrainer`` that trains and evaluates with Ulysses SP (module docstring).

    Takes SFTTrainer's arguments plus SPTrainer's ``sp_size``, ``ring_size`` (hybrid SP),
    ``attn_implementation``, ``check_identical`` and ``pad_token_id``; ``model`` is a transformers
    causal LM (an instance, or a name SFTTrainer loads). The data collator is SFTTrainer's (or yours) and must give full
    batches with ``labels``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, head_loss=TokenStatisticsHeadLoss(), **kwargs)

    def sp_refusals(self) -> dict[str, bool]:
        """SPTrainer's refusals and SFTTrainer settings the sharded loss cannot honour."""
        coef = self.router_aux_loss_coef
        return {
            **super().sp_refusals(),
            "loss_type='dft' (the sharded loss is the cross-entropy; use loss_type='nll')": self.args.loss_type
            == "dft",
            f"the MoE load-balancing loss (router_aux_loss_coef={coef}): the sharded loss does not add it; "
            "set SFTConfig(router_aux_loss_coef=0.0)": self.aux_loss_enabled,
            "vision datasets (images): ulysses_sp supports decoder-only language models": self._is_vision_dataset,
        }

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """SPTrainer's (full batches sharded, the step's label count), plus ``num_tokens``: the step's
        full batches counted once per SP group, summed over all ranks."""
        counts = []

        def counted():
            for batch in epoch_iterator:
                counts.append(sft_token_count(batch))
                yield batch

        batches, num_items = super().get_batch_samples(counted(), num_batches, device)
        total = torch.tensor(sum(counts), dtype=torch.int64)
        if self.sp_topology.world_size > 1:  # the P ranks of a group counted the same batches
            total = comm.all_reduce(total.to(device), None) // self.sp_topology.sp_size
        self._total_train_tokens += int(total)
        return batches, num_items

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """SPTrainer's sharded loss; logs SFTTrainer's per-token metrics of the micro-batch."""
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self._log_token_statistics("train" if self.model.training else "eval")
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """SPTrainer's eval loss of one batch (under SP, no logits); logs the per-token metrics."""
        out = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        if out[0] is not None:
            self._log_token_statistics("eval")
        return out

    def _log_token_statistics(self, mode: str) -> None:
        """Append the last loss call's entropy and accuracy over every rank to SFTTrainer's metrics."""
        sums = self.sp_head_loss.sums
        if self.sp_topology.world_size > 1:  # the shards of every sequence partition its tokens
            sums = comm.all_reduce(sums, None)
        entropy, hits, count = sums.tolist()
        metrics = self._metrics[mode]
        metrics["entropy"].append(entropy / count if count > 0 else 0.0)
        metrics["mean_token_accuracy"].append(hits / count if count > 0 else 0.0)
        metrics["num_tokens"] = [self._total_train_tokens]
