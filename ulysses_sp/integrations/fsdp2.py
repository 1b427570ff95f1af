"""FSDP2 (torch's ``fully_shard``) with Ulysses SP: parameters, gradients and optimizer state sharded
over every rank of the (dp, sp) mesh, as ZeRO-3 shards over the world.

    loss_module = shard_causal_lm(model, topology, param_dtype=torch.bfloat16)   # after ulysses_sp.apply
    optimizer = torch.optim.AdamW(loss_module.parameters(), lr=...)
    loss = loss_module(local_batch, num_items)        # ulysses_sp.causal_lm_loss inside the FSDP root
    loss.backward(); clip_grad_norm_(...); optimizer.step(); optimizer.zero_grad()

Gradient averaging. FSDP2 reduce-scatters each gradient as a mean over its mesh. Over the 1-D mesh
of all dp*P ranks that mean divides out the P of our loss (the SP ranks' gradients of one group sum
to P x the replica's, loss/causal_lm.py), exactly as the torch engine's world average does: the
sharded gradient is the reference gradient's shard, with no loss scaling. (A mesh over the DP group
alone would never combine the SP ranks' partial gradients.)

Units, each all-gathered in one collective and reduce-scattered in one:

* every decoder layer (transformers' ``GradientCheckpointingLayer``), resharded after its forward
  unless ``reshard_after_forward=False``;
* the input embedding, gathered for its forward and again for its backward at the end of the step;
* the output head, grouped with :class:`~ulysses_sp.loss.causal_lm.HeadLoss`: the loss reads the
  head's weight in tiles (or liger's fused kernel reads it whole), never through ``head.forward``,
  so the unit is entered by the loss module's own forward. The full V x D head is gathered around
  the loss only (its forward and backward), not through the decoder layers. Torch >= 2.13 lets one
  module of a group run without the others (``fully_shard([head, head_loss])``); before that a
  grouped unit whose head never runs forward is not re-gathered in the next step, so older torch
  keeps the head in the root unit (gathered from the loss's forward to the end of the backward);
  so does a head tied to the input embedding, whose weight the embedding reads first;
* the root (:class:`~ulysses_sp.loss.causal_lm.CausalLMLoss`): the rest (the final norm). Its inputs
  are not cast to ``param_dtype`` (the token count ``num_items`` would lose its exactness in bf16).

PEFT (LoRA): a PEFT model is sharded the same way, its units found in the transformers model inside
it (core/wrappers.py); each LoRA adapter lives in the decoder layer (or head) it was injected into and
so shares that layer's unit. A unit may mix frozen and trainable parameters: FSDP2 all-gathers both
and reduce-scatters only the gradients that exist, so the frozen base weights stay sharded, get no
gradient, and a unit holding only frozen ones (the embedding, the root's norm) reduces nothing.

Mixed precision: ``param_dtype`` is the compute dtype of the gathered parameters (bf16: sharded fp32
master weights, bf16 compute) and ``reduce_dtype`` that of the gradient reduce-scatter (fp32 by
default). Run checkpoints go through torch.distributed.checkpoint (``comm.save_sharded``), which
reshards on load: a run resumes at another world or SP size.
"""

from __future__ import annotations

import torch
from packaging.version import Version

from ..core import comm
from ..core.apply import is_applied
from ..core.log import logger
from ..core.topology import SPTopology
from ..core.wrappers import check_adapters, unwrap
from ..loss.causal_lm import CausalLMLoss, HeadLoss

#: the folder of a checkpoint directory holding FSDP2 shards (torch.distributed.checkpoint), written
#: by launch/train.py's FSDP2 engine and by SPTrainer under FSDP2
FSDP2_CHECKPOINT_DIR = "fsdp2"

#: the first torch whose grouped FSDP2 unit may run one module without the others (see above)
GROUPED_HEAD_TORCH = Version("2.13")


def shard_causal_lm(
    model: torch.nn.Module,
    topology: SPTopology,
    *,
    reshard_after_forward: bool = True,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
    head_loss: HeadLoss | None = None,
    **loss_kwargs,
) -> CausalLMLoss:
    """``CausalLMLoss(model, topology, **loss_kwargs)`` sharded by FSDP2 over all ranks (module
    docstring). ``model``: a causal LM or a PEFT model wrapping one (LoRA), with SP applied when
    ``topology.sp_size > 1``, its weights on the device of the topology's mesh and the same on every
    rank up to rank 0's broadcast (made identical here). ``head_loss``: the module the head and the
    cross-entropy run in (default a new :class:`HeadLoss`). Returns the FSDP root; ``model``'s
    parameters become DTensor shards (frozen ones too).
    """
    check_shardable(model, topology)
    lm = unwrap(model)
    comm.broadcast_parameters(model)  # identical on every rank before each keeps its shard
    mesh = comm.device_mesh(topology.device_type, (topology.world_size,), ("fsdp",))
    loss_module = CausalLMLoss(model, topology, **loss_kwargs)
    if head_loss is not None:
        loss_module.head_loss = head_loss

    def shard(module, reshard: bool, cast_inputs: bool = True) -> None:
        comm.fully_shard(
            module,
            mesh,
            reshard_after_forward=reshard,
            param_dtype=param_dtype,
            reduce_dtype=reduce_dtype,
            cast_forward_inputs=cast_inputs,
        )

    for layer in reversed(decoder_layers(lm)):  # bottom-up, as fully_shard requires
        shard(layer, reshard_after_forward)
    embedding, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    tied = embedding is not None and head.weight is embedding.weight
    if not tied:
        shard(embedding, True)
    if tied or Version(torch.__version__.split("+")[0]) < GROUPED_HEAD_TORCH:
        logger.info(
            "FSDP2: the output head stays in the root unit (%s), gathered from the loss's forward to the end "
            "of the backward",
            "tied to the input embedding" if tied else f"torch {torch.__version__} < {GROUPED_HEAD_TORCH}",
        )
    else:
        shard([head, loss_module.head_loss], True)
    # the root: needed again as soon as the backward starts. It does not cast its inputs: they are the
    # batch (integer ids, labels, positions; the units inside cast their own float inputs) and the step's
    # token count, which bf16 would round (8188 -> 8192: the loss and every gradient off by up to 0.4 %)
    shard(loss_module, False, cast_inputs=False)
    return loss_module


def check_shardable(model: torch.nn.Module, topology: SPTopology) -> None:
    """ValueError for a model FSDP2 cannot shard here, before any collective."""
    check_adapters(model)
    lm = unwrap(model)
    if comm.world_size() != topology.world_size:
        raise ValueError(f"the topology spans {topology.world_size} ranks but the world has {comm.world_size()}")
    if topology.sp_size > 1 and not is_applied(model):
        raise ValueError("shard_causal_lm: call ulysses_sp.apply(model, topology) first (SP size > 1)")
    if any(comm.is_fsdp_module(m) for m in model.modules()):
        raise ValueError("the model is already sharded by FSDP2 (fully_shard); pass the unsharded model once")
    if any(comm.is_sharded(p) for p in model.parameters()):
        raise ValueError("the model has DTensor parameters (tensor parallelism?); FSDP2 with SP shards plain ones")
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise ValueError("the model's parameters are DeepSpeed ZeRO-3 partitioned; use one engine, not both")
    wrong = {str(p.device) for p in model.parameters() if p.device.type != topology.device_type}
    if wrong:
        raise ValueError(
            f"the model's parameters are on {sorted(wrong)} but the process group's devices are "
            f"{topology.device_type}: move the model there (model.to(device)) before sharding"
        )
    if not decoder_layers(lm):
        raise ValueError(
            f"{type(lm).__name__} has no transformers decoder layers (GradientCheckpointingLayer) to shard one by one"
        )
    if lm.get_output_embeddings() is None or lm.get_input_embeddings() is None:
        raise ValueError(f"{type(lm).__name__} is not a causal LM with input embeddings and an output head")


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of ``model`` (transformers' ``GradientCheckpointingLayer``), in module order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
