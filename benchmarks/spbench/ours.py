"""The ulysses_sp side: the path the package's DeepSpeed engine takes (``ulysses_sp.train.engines``).

``apply`` on a fresh model, ``shard_batch`` for this rank's shard, ``CausalLMLoss`` (backbone +
tiled or liger cross-entropy, global token normalisation) handed to
``ulysses_sp.integrations.deepspeed.initialize`` (our mpu; ZeRO-3 partitions over all ranks, as
ALST's), backpropagated unscaled with ``engine.backward(..., scale_wrt_gas=False)``; then
``engine.step()``. Under ``--engine fsdp2``: ``shard_causal_lm`` (``launch/train.py --fsdp``'s
engine). Levers: ``sac`` (selective checkpointing policy), ``tiled_mlp`` (``tile_mlp``),
``offload`` (checkpoints in host memory), ``norms`` (RMSNorm recompute), ``liger`` / ``tiled`` (loss kernel), ``cudnn``,
``noac`` (no checkpointing), ``compile`` (compiled layers), ``heads2`` / ``heads4`` (head-chunked attention),
``ligerops`` (liger's fused RMSNorm, SiLU * mul, RoPE).
"""

from __future__ import annotations

import torch

from ulysses_sp import CausalLMLoss, apply, count_label_tokens, remove, shard_batch, sharded_rng, to_device
from ulysses_sp.core.topology import SPTopology
from ulysses_sp.integrations import deepspeed as ds_integration
from ulysses_sp.integrations.fsdp2 import shard_causal_lm
from ulysses_sp.memory.activation_checkpointing import enable_checkpointing
from ulysses_sp.memory.compile import compile_layers
from ulysses_sp.memory.fused_ops import fuse_elementwise
from ulysses_sp.memory.rms_norm import enable_rms_norm_recompute
from ulysses_sp.memory.tiled_mlp import tile_mlp

from . import levers as lv
from .fsdp2 import Fsdp2Engine, release
from .workload import Workload


class OursSide:
    name = "ours"

    def __init__(self, workload: Workload, topology: SPTopology):
        self.workload = workload
        self.topology = topology

    def prepare(self, levers: frozenset[str], seq_len: int) -> OursRun:
        return OursRun(self, levers, seq_len)


class OursRun:
    """One model + engine + batch, ready to step."""

    def __init__(self, side: OursSide, levers: frozenset[str], seq_len: int):
        wl, topo = side.workload, side.topology
        self.topology, self.levers = topo, levers
        # the model is built with a stock kernel name; apply() switches it to ours (private name)
        self.model = wl.build_model("sdpa")
        enable_checkpointing(self.model, lv.checkpoint_policy(levers), offload="offload" in levers)
        if "ligerops" in levers:
            fuse_elementwise(self.model)
        if "tiled_mlp" in levers:
            tile_mlp(self.model)
        if "norms" in levers:
            enable_rms_norm_recompute(self.model)
        chunks = 4 if "heads4" in levers else 2 if "heads2" in levers else 1
        apply(self.model, topo, attn_implementation=wl.attn, head_chunks=chunks)
        if "compile" in levers:
            compile_layers(self.model)
        use_liger = True if "liger" in levers else False if "tiled" in levers else None
        if wl.engine == "fsdp2":
            self.engine = Fsdp2Engine(shard_causal_lm(self.model, topo, param_dtype=wl.dtype, use_liger=use_liger), wl)
        else:
            module = CausalLMLoss(self.model, topo, use_liger=use_liger)
            self.engine, *_ = ds_integration.initialize(module, topo, wl.ds_config())
        full = wl.full_batch(seq_len, self.model.config.vocab_size)
        self.batch = to_device(shard_batch({"input_ids": full["input_ids"], "labels": full["labels"]}, topo), wl.device)

    def forward_backward(self) -> torch.Tensor:
        num_items = count_label_tokens(self.batch, self.topology)
        with sharded_rng(self.topology), lv.step_context(self.levers):
            loss = self.engine(self.batch, num_items)
            self.engine.backward(loss, scale_wrt_gas=False)
        return loss.detach()

    def update(self) -> None:
        self.engine.step()

    def close(self) -> None:
        release(self.engine)
        remove(self.model)
        self.engine = self.model = self.batch = None
