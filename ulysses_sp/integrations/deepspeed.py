"""DeepSpeed: an mpu built from SPTopology, and :func:`initialize`, whose engine reduces gradients to
the non-SP reference at ZeRO stages 0, 1, 2 and 3. The config side (SP size, batch sizes) is in
:mod:`ulysses_sp.integrations.deepspeed_config`.

Gradient averaging. Our loss (loss/causal_lm.py) is the full-sequence loss on every SP rank, through a
differentiable all-reduce, so the SP ranks' gradients sum to P x the replica's gradient: their
*mean* is the replica's gradient, and the right reduction over the world is a plain mean over all
ranks. DeepSpeed 0.19.8 divides the summed gradients by ``world / sequence_parallel_world_size``
at stages 0-2 and on stage 3's all-reduce path, but by ``world`` on stage 3's default reduce-scatter
path (measured: docs/deepspeed.md). :class:`SPMpu` therefore has no ``get_sequence_parallel_*``
methods: DeepSpeed takes its SP size as 1 (``groups._get_sequence_parallel_world_size``), divides
by ``world`` on every path, and the loss needs no scaling.

ZeRO-3 partition group. DeepSpeed 0.19.8 partitions ZeRO-3 parameters over
``mpu.get_data_parallel_group()`` whenever the mpu has that method
(``runtime/zero/parameter_offload.py``, ``_convert_to_zero_parameters``), and stage 3 reduce-scatters
each gradient over its parameter's partition group. With SP that group must hold every rank: over the
DP group alone the SP ranks' gradients are never combined, each SP rank steps with its own partial
gradient and the SP replicas drift apart (measured at sp=2: per-parameter ratios 0.96-1.98 to the
reference; a DP group of size 1 even skips the reduction). DeepSpeed's own SP mpu escapes this by
having no ``get_data_parallel_group``, which we need for the samplers and batch arithmetic.
:func:`initialize` partitions the model over all ranks itself before DeepSpeed sees it (DeepSpeed
then leaves ZeRO parameters as they are) and checks every parameter's group afterwards.
"""

from __future__ import annotations

import glob
import os

import torch
import transformers

from ..core import comm
from ..core.apply import applied_topology, apply, is_applied
from ..core.log import logger
from ..core.topology import SPTopology
from ..core.wrappers import unwrap
from .deepspeed_config import batch_sizes, load_config, prepare_config, zero_stage
from .sp_size import resolve_ring_size, resolve_sp_size

__all__ = [
    "SPMpu",
    "batch_sizes",
    "check_partitioning",
    "destroy",
    "init_comm",
    "initialize",
    "load_config",
    "prepare_config",
    "resolve_ring_size",
    "resolve_sp_size",
    "zero_stage",
]


class SPMpu:
    """The model-parallel unit DeepSpeed queries (``deepspeed.initialize(mpu=...)``), from an SPTopology.

    - data parallel (``topology.dp_group``): ranks that read different samples. DeepSpeed uses it for
      ``train_batch_size = micro x accumulation x dp_size`` and for its samplers.
    - sequence-data parallel (every rank): ZeRO partitions, gradient reductions and grad norms span it.
    - tensor / model / pipeline parallel: size 1, on a group of this rank alone (DeepSpeed's bf16
      optimizer at stage 0 asks for them, DeepSpeed #7833; gradient-norm sums run over them, so a
      group holding other SP ranks would add the norm of the same parameters several times).
    - no ``get_sequence_parallel_*``: see the module docstring (gradient averaging).

    Creating it is collective (the singleton groups): every rank must construct it.
    """

    def __init__(self, topology: SPTopology):
        self.topology = topology
        self._self_group = comm.self_group()

    # data parallel: ranks that read different samples
    def get_data_parallel_group(self):
        return self.topology.dp_group

    def get_data_parallel_world_size(self) -> int:
        return self.topology.dp_size

    def get_data_parallel_rank(self) -> int:
        return self.topology.dp_rank

    def get_data_parallel_group_ranks(self) -> list[int]:
        return [d * self.topology.sp_size + self.topology.sp_rank for d in range(self.topology.dp_size)]

    # sequence x data parallel: every rank
    def get_sequence_data_parallel_group(self):
        return comm.world_group()

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.topology.world_size

    def get_sequence_data_parallel_rank(self) -> int:
        return self.topology.rank

    # no tensor / pipeline model parallelism
    def get_model_parallel_group(self):
        return self._self_group

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_pipeline_model_parallel_group = get_model_parallel_group
    get_pipeline_model_parallel_world_size = get_model_parallel_world_size
    get_pipeline_model_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.topology.rank


def initialize(
    model: torch.nn.Module,
    topology: SPTopology,
    ds_config: str | dict,
    *,
    model_parameters=None,
    optimizer=None,
    lr_scheduler=None,
    micro_batch_size: int | None = None,
    gradient_accumulation_steps: int | None = None,
    **deepspeed_kwargs,
):
    """``deepspeed.initialize`` for a model trained with Ulysses SP over ``topology``.

    ``model``: the module DeepSpeed trains, a transformers model (SP is applied here when it is not
    yet) or a wrapper holding one with SP applied (e.g. a module whose forward returns the loss).
    ``ds_config``: a DeepSpeed JSON path or dict; ``"sequence_parallel_size"`` in it must equal
    ``topology.sp_size`` and ``"sequence_parallel_ring_size"`` ``topology.ring_size`` (resolve them
    first with :func:`resolve_sp_size` and :func:`resolve_ring_size`). ``micro_batch_size`` and
    ``gradient_accumulation_steps`` override the JSON (see :func:`prepare_config`). Builds the
    :class:`SPMpu`, partitions ZeRO-3 parameters over all ranks and forwards the rest
    (``training_data``, ``collate_fn``, ...) to ``deepspeed.initialize``.

    Returns DeepSpeed's ``(engine, optimizer, training_dataloader, lr_scheduler)``. Use it as usual:
    ``loss = ...; engine.backward(loss); engine.step()`` with the loss of loss/causal_lm.py, unscaled.
    """
    config = prepare_config(
        load_config(ds_config),
        topology,
        micro_batch_size=micro_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
    )
    _ensure_applied(model, topology)
    import deepspeed

    # zero.Init below reads DeepSpeed's world size: without its comm set up (deepspeed.initialize would
    # do it, but later) it counts 1 rank and rejects the batch sizes of dp > 1
    init_comm()
    mpu = SPMpu(topology)
    if zero_stage(config) == 3:
        _partition_over_all_ranks(model, config, mpu)
        gather_head_for_loss(model)
    if model_parameters is None and optimizer is None:
        model_parameters = [p for p in model.parameters() if p.requires_grad]
    engine, opt, loader, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=model_parameters,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        config=config,
        mpu=mpu,
        **deepspeed_kwargs,
    )
    if zero_stage(config) == 3:
        check_partitioning(engine.module, topology)
    return engine, opt, loader, scheduler


def init_comm() -> None:
    """Set up DeepSpeed's comm over the torch.distributed world already joined, leaving nothing behind.

    ``deepspeed.init_distributed`` (a no-op when it already ran), then the removal of the name of this
    rank's /dev/shm segment of DeepSpeed's CPU all-reduce. DeepSpeed 0.19.8 on CPU, when every rank is
    on one host (``LOCAL_SIZE``, which its launcher sets, equals the world size), creates one 66 MiB
    segment per rank there (``ops/csrc/cpu/comm/shm.cpp``) and never unlinks it: /dev/shm is RAM, and
    every run left ``world_size`` segments until reboot (a few hundred runs filled a 24 GiB machine).
    Each rank maps every peer's segment before init_distributed returns, so after a barrier the names
    are no longer needed: the mappings stay valid for this run and the kernel frees the memory when the
    last process exits, crash or not. The name mirrors shm.cpp's (an unset MASTER_ADDR or MASTER_PORT
    is empty there). The barrier is unconditional, so ranks whose /dev/shm differ cannot hang each other.
    """
    import deepspeed

    if "nccl" not in comm.backend() and comm.rank() == 0:
        _announce_cpu_op_build()
    deepspeed.init_distributed(dist_backend=comm.backend())
    if os.name != "posix":  # the shm all-reduce is POSIX shared memory
        return
    name = "deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
        os.getuid(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""), comm.rank()
    )
    comm.barrier()  # every peer has mapped this rank's segment
    path = os.path.join("/dev/shm", name)
    if os.path.exists(path):
        os.unlink(path)


def _announce_cpu_op_build() -> None:
    """Say that DeepSpeed is about to JIT-compile its CPU all-reduce op, when it has not been built yet:
    a silent half minute at the first run on a machine looks like a hang."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    if not glob.glob(os.path.join(root, "**", "deepspeed_shm_comm*.so"), recursive=True):
        logger.info(
            "DeepSpeed compiles its CPU shared-memory all-reduce op now: once per machine and torch "
            "version, about 30 s on 2 cores, cached in %s",
            root,
        )


def _ensure_applied(model: torch.nn.Module, topology: SPTopology) -> None:
    applied = [m for m in model.modules() if is_applied(m)]
    if not applied:
        if not isinstance(unwrap(model), transformers.PreTrainedModel):  # a PEFT model is applied inside
            raise ValueError(
                f"{type(model).__name__} holds no model with ulysses_sp applied: call "
                "ulysses_sp.apply(transformers_model, topology) on the model inside it first"
            )
        apply(model, topology)
    for m in applied:
        t = applied_topology(m)
        if (t.sp_size, t.dp_size) != (topology.sp_size, topology.dp_size):
            raise ValueError(
                f"{type(m).__name__} has ulysses_sp applied with sp={t.sp_size}, dp={t.dp_size}, "
                f"but DeepSpeed is being set up for sp={topology.sp_size}, dp={topology.dp_size}"
            )


def _partition_over_all_ranks(model: torch.nn.Module, config: dict, mpu: SPMpu) -> None:
    """Turn the model's parameters into ZeRO-3 parameters partitioned over every rank.

    What DeepSpeed would do itself, in its order (cast to the training dtype, then partition), with
    the sequence-data-parallel group instead of the DP group. A model built under ``zero.Init`` is
    left alone (and checked by :func:`check_partitioning`).
    """
    from deepspeed.runtime.zero.partition_parameters import Init, is_zero_param

    params = list(model.parameters())
    if any(is_zero_param(p) for p in params):
        return
    dtype = _training_dtype(config)
    if dtype is not None:
        for p in params:
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
    Init(
        module=model,
        data_parallel_group=mpu.get_sequence_data_parallel_group(),
        config_dict_or_path=config,
        mpu=mpu,
        dtype=dtype or params[0].dtype,
    )


def gather_head_for_loss(model: torch.nn.Module) -> None:
    """A CausalLMLoss's fused kernel reads its head's weight directly (liger takes the weight, not the
    module): register it as an external parameter of the loss's :class:`~ulysses_sp.loss.causal_lm.HeadLoss`, so
    ZeRO-3 gathers it around the loss only (not through the whole model's forward and backward) and
    reduces its gradient as usual."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    from ..loss.causal_lm import CausalLMLoss

    if isinstance(model, CausalLMLoss):
        head = unwrap(model.model).get_output_embeddings()  # a LoRA head's .weight is its frozen base weight
        if head is not None:
            register_external_parameter(model.head_loss, head.weight)


def _training_dtype(config: dict) -> torch.dtype | None:
    if config.get("fp16", {}).get("enabled"):
        return torch.float16
    if config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    return None


def check_partitioning(model: torch.nn.Module, topology: SPTopology) -> None:
    """Raise if a ZeRO-3 parameter is partitioned over fewer ranks than the world (see module docstring)."""
    for name, p in model.named_parameters():
        group = getattr(p, "ds_process_group", None)
        if group is not None and comm.world_size(group) != topology.world_size:
            raise RuntimeError(
                f"ZeRO-3 parameter {name} is partitioned over {comm.world_size(group)} ranks, not all "
                f"{topology.world_size}: its gradient would never be combined across the SP group. Build the "
                "model under deepspeed.zero.Init() with the default (world) group, or let "
                "ulysses_sp.integrations.deepspeed.initialize partition it"
            )


def destroy(engine) -> None:
    """``engine.destroy()``, then drop the references DeepSpeed 0.19.8 keeps to a ZeRO-3 engine
    afterwards, so that its model, parameters, gradients and optimizer states can be freed (without
    this, every ZeRO-3 engine built in a process stays allocated until the process ends; measured:
    7.2 GiB per engine for the 4-layer Llama-8B benchmark model on 4 GPUs). Two module-level roots:

    * ``deepspeed.runtime.zero.parameter_offload.FWD_MODULE_STACK``: the engine's root module is
      pushed at set-up and never popped; and every forward that torch's non-reentrant checkpoint
      stops early in a recomputation (its default) pushes the modules whose pre-forward hook ran
      but whose post-forward hook never did (per checkpointed layer and step, e.g. the MLP and its
      ``down_proj``). Every module of this engine is removed from it.
    * ``PartitionedParameterCoordinator.__params_to_release``: a class-level ``functools.lru_cache``
      whose keys hold the coordinator (and through it the optimizer and engine) and submodules.
      It is a pure cache of which parameters to release; it is cleared (for every engine: the other
      engines recompute their entries on the next step).

    The engine must not be used afterwards; other engines in the process are unaffected.
    """
    module = getattr(engine, "module", None)
    engine.destroy()
    if module is None:
        return
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    own = {id(m) for m in module.modules()}
    parameter_offload.FWD_MODULE_STACK[:] = [m for m in parameter_offload.FWD_MODULE_STACK if id(m) not in own]
    cached = getattr(PartitionedParameterCoordinator, "_PartitionedParameterCoordinator__params_to_release", None)
    wrapped = [cell.cell_contents for cell in getattr(cached, "__closure__", None) or ()]  # inside an NVTX wrapper
    for fn in (cached, *wrapped):
        if hasattr(fn, "cache_clear"):
            fn.cache_clear()
