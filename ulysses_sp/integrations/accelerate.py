"""Accelerate: the SP size from an Accelerate config, and SP applied to what ``accelerator.prepare``
makes (model, optimizer, dataloader), with gradients reduced to the non-SP reference.

How the SP size gets here. ``accelerate launch`` copies the ``parallelism_config`` section of its
YAML into environment variables of every process (``ACCELERATE_USE_PARALLELISM_CONFIG=true``,
``PARALLELISM_CONFIG_SP_SIZE``, ``PARALLELISM_CONFIG_SP_BACKEND``, ...). Accelerate 1.15 accepts only
``sp_backend: deepspeed``, which makes ``Accelerator.prepare`` run DeepSpeed's ALST (a process-wide
attention swap and its own dataloader adapter) under ``distributed_type: DEEPSPEED``. ulysses_sp
uses Accelerate's own keys with a backend value of its own::

    parallelism_config:
      parallelism_config_sp_size: 2
      parallelism_config_sp_backend: ulysses_sp

The launcher passes the value through unchecked (only its CLI flag has ``choices``), but
``ParallelismConfig`` would reject it when an ``Accelerator`` is created. :func:`claim_sp_size`
therefore reads the size and then hides SP from Accelerate in this process's environment: the size
moves to ``ULYSSES_SP_SIZE``, ``PARALLELISM_CONFIG_SP_SIZE`` becomes 1 and the backend the inert
``deepspeed``, and ``ACCELERATE_USE_PARALLELISM_CONFIG`` becomes ``false``. ALST can then never run
next to ulysses_sp. Call it before ``Accelerator()`` (``SPTrainer`` and ``launch/train.py`` do).
``ULYSSES_SP_SIZE`` may also be set by hand.

Keys ignored: ``sp_seq_length`` and ``sp_seq_length_is_variable`` (ulysses_sp pads every batch to
a multiple of the SP size, so the length may change from batch to batch), and
``sp_attn_implementation`` (the launcher writes ``sdpa`` whenever it is unset, so it cannot tell a
choice from the default; pass ``attn_implementation`` / ``--attn``). Ignoring the first two is
also what keeps the launcher's bug harmless here: ``--parallelism_config_sp_seq_length_is_variable
False`` is parsed with ``type=bool`` and arrives as ``True``. The booleans read here are parsed
strictly (:func:`env_flag`): an unknown spelling is an error, not ``True``.

Gradient convention (docs/loss.md): the loss of :func:`ulysses_sp.causal_lm_loss` is the SP group's
CE sum / n on every rank of the group, so the SP ranks' gradients sum to P x the reference and the
engine must average over all world ranks. DDP (Accelerate's MULTI_GPU/MULTI_CPU) averages over its
process group, the world: that is the convention. DeepSpeed prepared by Accelerate gets no SP mpu
here, so its data-parallel group is the world too and it averages over all ranks as well.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping, Sequence
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.distributed as dist

from ..data.loader import SPShardAdapter
from ..loss.causal_lm import CausalLMLoss, count_label_tokens, reduce_loss_for_logging
from ..core.rng import sharded_rng
from ..core.topology import SPTopology, init_sp
from . import deepspeed as ds_integration
from ..core.apply import apply

#: the ``parallelism_config_sp_backend`` value that selects ulysses_sp.
SP_BACKEND = "ulysses_sp"
#: where :func:`claim_sp_size` keeps the size once Accelerate no longer sees it (may be set by hand).
ENV_SP_SIZE = "ULYSSES_SP_SIZE"

_USE_PC = "ACCELERATE_USE_PARALLELISM_CONFIG"
_PC = "PARALLELISM_CONFIG_"
_OTHER_SIZES = ("DP_REPLICATE_SIZE", "DP_SHARD_SIZE", "TP_SIZE", "CP_SIZE")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def env_flag(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """A boolean environment variable, parsed strictly: true/1/yes/on or false/0/no/off/empty
    (any case); unset is False. Anything else is a ValueError, not True (cf. ``bool("False")``)."""
    env = os.environ if environ is None else environ
    value = env.get(name)
    if value is None:
        return False
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{name}={value!r} is not a boolean; use true or false")


def _env_int(name: str, env: Mapping[str, str], default: int) -> int:
    value = env.get(name)
    if value is None or value.strip() in ("", "None"):
        return default
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None
    if number < 1:
        raise ValueError(f"{name}={number} must be >= 1")
    return number


def read_sp_size(environ: Mapping[str, str] | None = None) -> int | None:
    """The ulysses_sp SP size in the environment, or None when there is none.

    Read from ``ULYSSES_SP_SIZE`` or from Accelerate's ``parallelism_config`` variables with
    ``sp_backend: ulysses_sp`` (both present: they must agree). An Accelerate config asking for SP
    with ``sp_backend: deepspeed`` (DeepSpeed's ALST), or for other parallelisms (dp_shard, tp, cp),
    is a ValueError naming the fix. Reads only; :func:`claim_sp_size` also hides SP from Accelerate.
    """
    env = os.environ if environ is None else environ
    own = _env_int(ENV_SP_SIZE, env, 0) if env.get(ENV_SP_SIZE) else None
    backend = env.get(_PC + "SP_BACKEND")
    size = _env_int(_PC + "SP_SIZE", env, 1)
    if backend == SP_BACKEND:
        others = {k.lower(): _env_int(_PC + k, env, 1) for k in _OTHER_SIZES}
        others = {k: v for k, v in others.items() if v > 1}
        if others:
            keys = ", ".join(f"parallelism_config_{k}: {v}" for k, v in others.items())
            raise ValueError(f"the Accelerate config combines parallelism_config_sp_backend: {SP_BACKEND} with {keys}; "
                             "ulysses_sp runs data parallelism over world / sp_size ranks (DDP or DeepSpeed) and "
                             "nothing else: set those sizes to 1")
        if own is not None and own != size:
            raise ValueError(f"{ENV_SP_SIZE}={own} disagrees with parallelism_config_sp_size: {size} of the Accelerate "
                             "config; unset one of them or make them equal")
        return size
    if backend not in (None, "deepspeed"):
        raise ValueError(f"parallelism_config_sp_backend: {backend!r} is unknown; use {SP_BACKEND!r} for ulysses_sp")
    if size > 1 and (env_flag(_USE_PC, env) or backend is not None):
        raise ValueError(f"the Accelerate config asks for parallelism_config_sp_size: {size} with sp_backend "
                         f"{backend or 'deepspeed'!r}, which is DeepSpeed's ALST, not ulysses_sp; set "
                         f"parallelism_config_sp_backend: {SP_BACKEND} in the config's parallelism_config section")
    return own


def claim_sp_size(environ: MutableMapping[str, str] | None = None) -> int | None:
    """:func:`read_sp_size`, then hide SP from Accelerate in ``environ`` (default ``os.environ``).

    Afterwards the size is in ``ULYSSES_SP_SIZE`` (so calling again returns it), an ``Accelerator``
    created in this process sees ``sp_size`` 1 and no parallelism config, and DeepSpeed's ALST can
    not be activated by it. Call before ``Accelerator()`` / ``TrainingArguments`` are created.
    Returns None (and changes nothing) when the environment holds no ulysses_sp SP size.
    """
    env = os.environ if environ is None else environ
    size = read_sp_size(env)
    if size is None:
        return None
    env[ENV_SP_SIZE] = str(size)
    if env.get(_PC + "SP_BACKEND") == SP_BACKEND:
        env[_PC + "SP_SIZE"] = "1"
        env[_PC + "SP_BACKEND"] = "deepspeed"  # the only value Accelerate 1.15 accepts; inert at size 1
        env[_USE_PC] = "false"
    return size


def deepspeed_config_file(environ: Mapping[str, str] | None = None) -> str | None:
    """The DeepSpeed config file of an ``accelerate launch`` with ``distributed_type: DEEPSPEED``,
    or None when Accelerate did not launch DeepSpeed."""
    env = os.environ if environ is None else environ
    if not env_flag("ACCELERATE_USE_DEEPSPEED", env):
        return None
    return env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or "(set in the Accelerate config's deepspeed_config)"


def launched_deepspeed_config_file(environ: Mapping[str, str] | None = None) -> str | None:
    """The DeepSpeed JSON an ``accelerate launch`` with ``deepspeed_config_file`` names, else None."""
    env = os.environ if environ is None else environ
    return env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") if env_flag("ACCELERATE_USE_DEEPSPEED", env) else None


def resolve_sp_size(cli_sp_size: int | None, ds_config: dict, environ: MutableMapping[str, str] | None = None) -> int:
    """SP size of launch/train.py: ``--sp-size``, else the DeepSpeed JSON's ``sequence_parallel_size``,
    else the Accelerate config's (claimed, see :func:`claim_sp_size`), else 1. Two sources that
    disagree are a ValueError, and so is an Accelerate launch with DeepSpeed or FSDP that the
    trainer would silently not use (DeepSpeed needs ``--deepspeed CONFIG.json``; FSDP is unsupported).
    """
    env = os.environ if environ is None else environ
    accelerate_sp = claim_sp_size(env)
    ds_file = deepspeed_config_file(env)
    if ds_file is not None and not ds_config:
        raise ValueError(f"accelerate launched DeepSpeed (deepspeed_config_file {ds_file}), but launch/train.py trains "
                         f"with DeepSpeed only when given --deepspeed: add --deepspeed {ds_file} to its arguments")
    if env_flag("ACCELERATE_USE_FSDP", env):
        raise ValueError("accelerate launched FSDP, which launch/train.py does not support; use an Accelerate config "
                         "with distributed_type MULTI_GPU (configs/accelerate/sp2.yaml) or DEEPSPEED")
    resolved = ds_integration.resolve_sp_size(cli_sp_size, ds_config)
    if accelerate_sp is None:
        return resolved
    explicit = cli_sp_size is not None or ds_config.get("sequence_parallel_size") is not None
    if explicit and resolved != accelerate_sp:
        given = f"--sp-size {cli_sp_size}" if cli_sp_size is not None else (
            f"\"sequence_parallel_size\": {ds_config['sequence_parallel_size']} in the DeepSpeed config")
        raise ValueError(f"{given} disagrees with the Accelerate config's SP size {accelerate_sp} "
                         f"(parallelism_config_sp_size or {ENV_SP_SIZE}); give one of them, or make them equal")
    return accelerate_sp


# --- applying SP to Accelerate-prepared objects ---------------------------------------------------


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


def check_accelerator(accelerator) -> None:
    """Raise a ValueError naming the fix when ``accelerator`` cannot run ulysses_sp: ALST
    configured, an unsupported distributed type, or processes Accelerate does not see."""
    pc = getattr(accelerator, "parallelism_config", None)
    if pc is not None and pc.sp_size > 1:
        raise ValueError(f"the Accelerator has a parallelism_config with sp_size={pc.sp_size} (sp_backend "
                         f"{pc.sp_backend!r}: DeepSpeed's ALST would replace attention in prepare); call "
                         "ulysses_sp.integrations.accelerate.claim_sp_size() before creating the Accelerator and do "
                         "not pass an SP parallelism_config")
    if accelerator.distributed_type not in _distributed_types():
        raise ValueError(f"ulysses_sp supports Accelerate with DDP (MULTI_GPU, MULTI_CPU, ...), DEEPSPEED or a single "
                         f"process; got {accelerator.distributed_type}")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise ValueError(f"the launcher started {launched} processes but Accelerate sees {accelerator.num_processes}: "
                         "on a machine without GPUs create Accelerator(cpu=True) or TrainingArguments(use_cpu=True) "
                         "(or set ACCELERATE_USE_CPU=true); the MULTI_GPU launcher starts the processes but "
                         "Accelerate then runs each one alone")


def ensure_process_group() -> None:
    """A world of one (gloo) when Accelerate runs a single process without torch.distributed."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


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
        raise ValueError("the dataloader was prepared with dispatch_batches=True (Accelerate's default for iterable "
                         "datasets): process 0 reads and slices every batch by global rank; create the Accelerator "
                         "with DataLoaderConfiguration(dispatch_batches=False)")
    shards = [obj for obj in (getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None),
                              getattr(loader, "dataset", None))
              if isinstance(obj, (BatchSamplerShard, IterableDatasetShard))]
    if not shards and topology.world_size > 1:
        raise ValueError(f"found no Accelerate shard in the prepared {type(loader).__name__}; pass a torch DataLoader "
                         "built with batch_size (or a batch_sampler) to accelerator.prepare")
    for shard in shards:
        shard.num_processes, shard.process_index = topology.dp_size, topology.dp_rank
        if topology.dp_size == 1 and isinstance(shard, BatchSamplerShard):
            shard.even_batches = False  # one replica: batches as the unsharded loader makes them, last one partial
    return loader


def prepare_sp(accelerator, model, optimizer, dataloader, *, sp_size: int | None = None,
               attn_implementation: str | None = None, check_identical: bool = True) -> SPPrepared:
    """Apply SP to a transformers causal LM and ``accelerator.prepare`` it with ``optimizer`` and
    ``dataloader`` (call this instead of ``accelerator.prepare`` for these three).

    ``sp_size``: default the Accelerate config's (:func:`claim_sp_size`), else 1. The model gets
    :func:`ulysses_sp.apply` and is prepared wrapped in :class:`~ulysses_sp.CausalLMLoss`, so the
    loss runs inside the DDP / DeepSpeed forward. The dataloader (full batches, e.g. with
    :func:`ulysses_sp.data.collate_padded`) is re-keyed by DP rank (:func:`key_loader_by_dp`) and
    wrapped in :class:`~ulysses_sp.SPShardAdapter` (``check_identical``: compare a checksum of every
    batch over the SP group). Train with :func:`train_step`. Step an LR scheduler yourself, once per
    optimizer step: an Accelerate-prepared scheduler steps once per process (dp x sp times).
    """
    check_accelerator(accelerator)
    size = sp_size if sp_size is not None else (claim_sp_size() or 1)
    ensure_process_group()
    topology = init_sp(size)
    apply(model, topology, attn_implementation=attn_implementation)
    loss_model, optimizer, loader = accelerator.prepare(CausalLMLoss(model, topology), optimizer, dataloader)
    key_loader_by_dp(loader, topology)
    shards = SPShardAdapter(loader, topology, check_identical=check_identical)
    return SPPrepared(topology, loss_model, optimizer, shards)


def train_step(accelerator, model, optimizer, micro_batches: Sequence[Mapping], topology: SPTopology, *,
               max_grad_norm: float | None = None) -> torch.Tensor:
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

    if not micro_batches:
        raise ValueError("train_step needs at least one micro-batch")
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    num_items = count_label_tokens(micro_batches, topology)
    losses = []
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        accelerator.gradient_state._set_sync_gradients(last)
        context = nullcontext() if (last or deepspeed) else accelerator.no_sync(model)
        with context:
            with sharded_rng(topology):
                loss = model(batch, num_items)
            if deepspeed:
                accelerator.backward(loss, scale_wrt_gas=False)
            else:
                accelerator.backward(loss * accelerator.gradient_accumulation_steps)
        losses.append(loss.detach())
    if max_grad_norm is not None and not deepspeed:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad()
    return reduce_loss_for_logging(losses, topology)
