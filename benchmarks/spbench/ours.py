"""The ulysses_sp side: the path the package's DeepSpeed engine takes (``ulysses_sp.engine``).

``apply`` on a fresh model, ``shard_batch`` for this rank's shard, ``CausalLMLoss`` (backbone +
tiled or liger cross-entropy, global token normalisation) as the module given to
``deepspeed.initialize`` with ``SPMpu``; the loss is scaled by ``loss_scale`` and backpropagated
with ``engine.backward(..., scale_wrt_gas=False)``; then ``engine.step()``.

ZeRO-3 partition group: DeepSpeed 0.19.8 partitions ZeRO-3 parameters over
``mpu.get_data_parallel_group()`` when the mpu has that method (``parameter_offload.py``,
``_convert_to_zero_parameters``; ALST's mpu module lacks it, so it gets the whole world). SPMpu
answers with the pure data-parallel group (size 1 at sp = world), so ZeRO-3 would neither shard
the parameters nor reduce their gradients across the SP ranks: every rank keeps full weights and
optimizer states and steps on its own shard's gradient (measured on CPU: cosine 0.7 against the
reference gradient, ranks drifting apart). To compare like with like, this side converts the model
to ZeRO-3 parameters over the sequence-data-parallel group (all ranks, as ALST) before
``deepspeed.initialize`` whenever the two groups differ; ``zero_partition_ranks`` in each record
says what the run used.
"""

from __future__ import annotations

import deepspeed
import torch
import torch.distributed as dist

from ulysses_sp import CausalLMLoss, apply, count_label_tokens, remove, shard_batch, sharded_rng, to_device
from ulysses_sp.integrations.deepspeed import SPMpu, loss_scale
from ulysses_sp.topology import SPTopology

from . import levers as lv
from .workload import Workload


class OursSide:
    name = "ours"

    def __init__(self, workload: Workload, topology: SPTopology):
        self.workload = workload
        self.topology = topology
        self._mpu = None  # one SPMpu per process: it creates process groups

    @property
    def mpu(self) -> SPMpu:
        if self._mpu is None:
            self._mpu = SPMpu(self.topology)
        return self._mpu

    def prepare(self, levers: frozenset[str], seq_len: int) -> OursRun:
        return OursRun(self, levers, seq_len)


class OursRun:
    """One model + engine + batch, ready to step."""

    def __init__(self, side: OursSide, levers: frozenset[str], seq_len: int):
        wl, topo = side.workload, side.topology
        self.topology, self.levers = topo, levers
        # the model is built with a stock kernel name; apply() switches it to ours (private name)
        self.model = wl.build_model("sdpa")
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=lv.checkpoint_kwargs(levers))
        apply(self.model, topo, attn_implementation=wl.attn)
        use_liger = True if "liger" in levers else False if "tiled" in levers else None
        config = wl.ds_config()
        self.scale = loss_scale(config, topo)
        module = CausalLMLoss(self.model, topo, use_liger=use_liger)
        if wl.zero_stage == 3:
            sdp_group = side.mpu.get_sequence_data_parallel_group()
            if dist.get_world_size(side.mpu.get_data_parallel_group()) != dist.get_world_size(sdp_group):
                deepspeed.zero.Init(module=self.model, data_parallel_group=sdp_group, config_dict_or_path=config,
                                    dtype=wl.dtype)
        self.engine, *_ = deepspeed.initialize(model=module, model_parameters=list(self.model.parameters()),
                                               config=config, mpu=side.mpu)
        full = wl.full_batch(seq_len, self.model.config.vocab_size)
        self.batch = to_device(shard_batch({"input_ids": full["input_ids"], "labels": full["labels"]}, topo),
                               wl.device)

    def step(self) -> torch.Tensor:
        num_items = count_label_tokens(self.batch, self.topology)
        with sharded_rng(self.topology), lv.step_context(self.levers):
            loss = self.engine(self.batch, num_items)
            self.engine.backward(loss * self.scale, scale_wrt_gas=False)
        self.engine.step()
        return loss.detach()

    def close(self) -> None:
        self.engine.destroy()
        remove(self.model)
        self.engine = self.model = self.batch = None
