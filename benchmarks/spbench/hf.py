"""The plain transformers side (``hf``): the model as transformers ships it, its own loss and its
own gradient checkpointing, under the same engine and config as the other sides (DeepSpeed, or
FSDP2 sharded per decoder layer and at the root: spbench/fsdp2.py); no
sequence parallelism, so it runs at sp=1 only (each rank a data-parallel replica).

* Loss: ``model(input_ids=..., labels=...).loss``: the full [B, S, V] logits, upcast to fp32, with
  transformers' ``ForCausalLMLoss`` (mean over the labelled tokens).
* Checkpointing: ``gradient_checkpointing_enable`` with non-reentrant checkpoints of every decoder
  layer ("full"); ``sac`` passes ulysses_sp's selective policy through the same transformers switch
  (what a transformers user can do with ``gradient_checkpointing_kwargs``), ``noac`` leaves it off.
* ``liger``: liger-kernel's fused linear cross-entropy on this model instance (only the loss:
  ``apply_liger_kernel_to_llama(model=..., fused_linear_cross_entropy=True)``, the other kernels off).
"""

from __future__ import annotations

import deepspeed
import torch

from ulysses_sp.memory.activation_checkpointing import gradient_checkpointing_kwargs

from . import levers as lv
from .fsdp2 import Fsdp2Engine, release, shard_plain
from .workload import Workload


class HfSide:
    name = "hf"

    def __init__(self, workload: Workload):
        self.workload = workload

    def prepare(self, levers: frozenset[str], seq_len: int) -> HfRun:
        return HfRun(self, levers, seq_len)


class HfRun:
    """One plain model + DeepSpeed engine + batch, ready to step."""

    def __init__(self, side: HfSide, levers: frozenset[str], seq_len: int):
        wl = side.workload
        self.levers = levers
        self.model = wl.build_model(wl.attn)
        policy = lv.checkpoint_policy(levers)
        if policy != "none":
            self.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs=gradient_checkpointing_kwargs(policy)
            )
        if "liger" in levers:
            from liger_kernel.transformers import apply_liger_kernel_to_llama

            apply_liger_kernel_to_llama(
                rope=False,
                cross_entropy=False,
                fused_linear_cross_entropy=True,
                rms_norm=False,
                swiglu=False,
                model=self.model,
            )
        if wl.engine == "fsdp2":
            self.engine = Fsdp2Engine(shard_plain(self.model, wl), wl)
        else:
            self.engine, *_ = deepspeed.initialize(
                model=self.model, model_parameters=list(self.model.parameters()), config=wl.ds_config()
            )
        full = wl.full_batch(seq_len, self.model.config.vocab_size)
        self.batch = {k: full[k].to(wl.device) for k in ("input_ids", "labels", "position_ids")}

    def forward_backward(self) -> torch.Tensor:
        with lv.step_context(self.levers):
            loss = self.engine(**self.batch, use_cache=False).loss
            self.engine.backward(loss)
        return loss.detach()

    def update(self) -> None:
        self.engine.step()

    def close(self) -> None:
        release(self.engine)
        self.engine = self.model = self.batch = None
