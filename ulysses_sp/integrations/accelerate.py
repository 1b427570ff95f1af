"""Accelerate: SP applied to what ``accelerator.prepare`` makes (model, optimizer, dataloader), with
gradients reduced to the non-SP reference. The SP and ring sizes come from :mod:`.sp_size` (explicit
values, else the Accelerate config's, see :mod:`.accelerate_env`).

Gradient convention (docs/loss.md): the loss of :func:`ulysses_sp.causal_lm_loss` is the SP group's
CE sum / n on every rank of the group, so the SP ranks' gradients sum to P x the reference and the
engine must average over all world ranks. DDP (Accelerate's MULTI_GPU/MULTI_CPU) averages over its
process group, the world: that is the convention. DeepSpeed prepared by Accelerate gets no SP mpu
here, so its data-parallel group is the world too and it averages over all ranks as well.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import NamedTuple

import torch

from ..core import comm
from ..core.apply import apply
from ..core.topology import SPTopology, init_sp
from ..data.loader import SPShardAdapter
from ..loss.causal_lm import CausalLMLoss
from ..loss.step import accumulate_step
from .sp_size import resolve_ring_size, resolve_sp_size


class SPPrepared(NamedTuple):
    """What :func:`prepare_sp` returns. ``model`` is the prepared :class:`~ulysses_sp.CausalLMLoss`
    (``loss = model(local_batch, num_items)``; the transformers model is
    ``accelerator.unwrap_model(model).model``); ``dataloader`` yields local shards."""

    topology: SPTopology
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    dataloader: SPShardAdapter


def _distributed_types():
    from accelerate.utils import DistributedType

    supported = {DistributedType.NO, DistributedType.DEEPSPEED}
    supported |= {t for t in DistributedType if t.name.startswith("MULTI_")}
    return supported


def check_accelerator(accelerator, *, allow_fsdp: bool = False) -> None:
    """Raise a ValueError naming the fix when ``accelerator`` cannot run ulysses_sp: ALST
    configured, an unsupported distributed type, or processes Accelerate does not see.
    ``allow_fsdp``: the caller shards with FSDP2 itself (SPTrainer), so Accelerate's FSDP type is fine."""
    pc = getattr(accelerator, "parallelism_config", None)
    if pc is not None and pc.sp_size > 1:
        raise ValueError(
            f"the Accelerator has a parallelism_config with sp_size={pc.sp_size} (sp_backend "
            f"{pc.sp_backend!r}: DeepSpeed's ALST would replace attention in prepare); call "
            "ulysses_sp.claim_sp_size() before creating the Accelerator and do "
            "not pass an SP parallelism_config"
        )
    if accelerator.distributed_type not in _distributed_types() and not (
        allow_fsdp and accelerator.distributed_type.name == "FSDP"
    ):
        raise ValueError(
            f"ulysses_sp supports Accelerate with DDP (MULTI_GPU, MULTI_CPU, ...), DEEPSPEED or a single "
            f"process; got {accelerator.distributed_type}"
        )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise ValueError(
            f"the launcher started {launched} processes but Accelerate sees {accelerator.num_processes}: "
            "on a machine without GPUs create Accelerator(cpu=True) or TrainingArguments(use_cpu=True) "
            "(or set ACCELERATE_USE_CPU=true); the MULTI_GPU launcher starts the processes but "
            "Accelerate then runs each one alone"
        )


def ensure_process_group() -> None:
    """A world of one (gloo) when Accelerate runs a single process without torch.distributed."""
    if not comm.is_initialized():
        comm.init_single_process_world()


def key_loader_by_dp(loader, topology: SPTopology):
    """Re-key an Accelerate-prepared loader from the global rank to the DP rank, in place.

    ``accelerator.prepare(dataloader)`` shards batches over all ``num_processes`` ranks, so the
    ranks of an SP group would read different samples. This sets the shard's ``num_processes`` /
    ``process_index`` to ``dp_size`` / ``dp_rank`` (batch sampler or iterable-dataset shard): the SP
    group then reads identical batches, DP replicas disjoint ones, and everything Accelerate does
    around it (RNG sync, even batches, ``skip_first_batches``) stays. With ``dp_size == 1`` a batch
    sampler yields exactly the unsharded loader's batches (Accelerate leaves a one-process loader
    unsharded; its shard would fill the last batch with repeated samples); an iterable dataset's
    shard still fills a partial last batch. Returns ``loader``.
    """
    from accelerate.data_loader import BatchSamplerShard, DataLoaderDispatcher, IterableDatasetShard

    if isinstance(loader, DataLoaderDispatcher):
        raise ValueError(
            "the dataloader was prepared with dispatch_batches=True (Accelerate's default for iterable "
            "datasets): process 0 reads and slices every batch by global rank; create the Accelerator "
            "with DataLoaderConfiguration(dispatch_batches=False)"
        )
    shards = [
        obj
        for obj in (
            getattr(loader, "batch_sampler", None),
            getattr(loader, "sampler", None),
            getattr(loader, "dataset", None),
        )
        if isinstance(obj, (BatchSamplerShard, IterableDatasetShard))
    ]
    if not shards and topology.world_size > 1:
        raise ValueError(
            f"found no Accelerate shard in the prepared {type(loader).__name__}; pass a torch DataLoader "
            "built with batch_size (or a batch_sampler) to accelerator.prepare"
        )
    for shard in shards:
        shard.num_processes, shard.process_index = topology.dp_size, topology.dp_rank
        if topology.dp_size == 1 and isinstance(shard, BatchSamplerShard):
            shard.even_batches = False  # one replica: batches as the unsharded loader makes them, last one partial
    return loader


def prepare_sp(
    accelerator,
    model,
    optimizer,
    dataloader,
    *,
    sp_size: int | None = None,
    ring_size: int | str | None = None,
    attn_implementation: str | None = None,
    check_identical: bool = True,
) -> SPPrepared:
    """Apply SP to a transformers causal LM and ``accelerator.prepare`` it with ``optimizer`` and
    ``dataloader`` (call this instead of ``accelerator.prepare`` for these three).

    ``sp_size``: default the Accelerate config's (:func:`~.accelerate_env.claim_sp_size`), else 1.
    ``ring_size``: hybrid SP, ring attention across ``ring_size`` groups of ``sp_size / ring_size``
    Ulysses ranks; an integer or ``"auto"``, default the Accelerate config's ``cp_size``, else 1
    (:func:`~.sp_size.resolve_ring_size`). The model gets
    :func:`ulysses_sp.apply` and is prepared wrapped in :class:`~ulysses_sp.CausalLMLoss`, so the
    loss runs inside the DDP / DeepSpeed forward. The dataloader (full batches, e.g. with
    :func:`ulysses_sp.data.collate_padded`) is re-keyed by DP rank (:func:`key_loader_by_dp`) and
    wrapped in :class:`~ulysses_sp.SPShardAdapter` (``check_identical``: compare a checksum of every
    batch over the SP group). Train with :func:`train_step`. Step an LR scheduler yourself, once per
    optimizer step: an Accelerate-prepared scheduler steps once per process (dp x sp times).
    """
    check_accelerator(accelerator)
    size = resolve_sp_size(sp_size, explicit_source=f"prepare_sp(sp_size={sp_size})")
    ring = resolve_ring_size(ring_size, size, model, explicit_source="prepare_sp(ring_size={})")
    ensure_process_group()
    topology = init_sp(size, ring)
    apply(model, topology, attn_implementation=attn_implementation)
    loss_model, optimizer, loader = accelerator.prepare(CausalLMLoss(model, topology), optimizer, dataloader)
    key_loader_by_dp(loader, topology)
    shards = SPShardAdapter(loader, topology, check_identical=check_identical)
    return SPPrepared(topology, loss_model, optimizer, shards)


def train_step(
    accelerator,
    model,
    optimizer,
    micro_batches: Sequence[Mapping],
    topology: SPTopology,
    *,
    max_grad_norm: float | None = None,
) -> torch.Tensor:
    """One optimizer step over this rank's shards of the step's micro-batches; returns the step's
    loss (global token mean over every micro-batch and DP replica, the same on every rank).

    Every micro-batch's loss is normalised by the labelled tokens of the whole step
    (:func:`~ulysses_sp.count_label_tokens`), so the accumulated, world-averaged gradient is the
    non-SP reference's. Around the engines: Accelerate divides a non-DeepSpeed loss by its
    ``gradient_accumulation_steps`` (undone here), DeepSpeed is told the accumulation boundary and
    not to scale by its own accumulation steps, and DDP reduces only at the last micro-batch.
    ``max_grad_norm`` clips with ``accelerator.clip_grad_norm_`` (DeepSpeed clips by its config).
    """
    from accelerate.utils import DistributedType

    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED

    def forward_backward(batch, num_items, last: bool) -> torch.Tensor:
        accelerator.gradient_state._set_sync_gradients(last)
        with nullcontext() if (last or deepspeed) else accelerator.no_sync(model):
            loss = model(batch, num_items)
            if deepspeed:
                accelerator.backward(loss, scale_wrt_gas=False)
            else:
                accelerator.backward(loss * accelerator.gradient_accumulation_steps)
        return loss

    loss = accumulate_step(micro_batches, topology, forward_backward)
    if max_grad_norm is not None and not deepspeed:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad()
    return loss
