"""The DeepSpeed engine: ``integrations.deepspeed.initialize`` over :class:`CausalLMLoss`, so the loss
runs inside the DeepSpeed engine's forward (ZeRO-3 hooks gather the head and the backbone there)."""

from __future__ import annotations

import copy
import os

import torch

from ...core.log import logger
from ...core.topology import SPTopology
from ...integrations import deepspeed as ds_integration
from ...loss.causal_lm import CausalLMLoss
from ..config import TrainConfig
from . import DEEPSPEED_DIR, NATIVE_TAG, warmup_cosine


def run_config(
    ds_config: dict, config: TrainConfig, dtype: torch.dtype, device_type: str, load_universal: bool = False
) -> tuple[dict, list[str]]:
    """The DeepSpeed config of this run: ``ds_config`` with what the flags set (learning rate, weight
    decay, clipping, the dtype; the batch keys are set by ``initialize``), and a line per JSON value a
    flag replaces (batch keys included). Torch's Adam on CPU (``device_type`` is the detected device), so that DeepSpeed
    does not JIT-build its fused Adam there."""
    ds = copy.deepcopy(ds_config)
    if load_universal:
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
    ds.pop("train_batch_size", None)  # recomputed from the flags: micro x accumulation x dp
    optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = optimizer.setdefault("params", {})
    settings = [  # (where in the JSON, its dict, key, value, the flag that sets it)
        ("gradient_clipping", ds, "gradient_clipping", config.max_grad_norm, "--max-grad-norm"),
        ("bf16.enabled", ds.setdefault("bf16", {}), "enabled", dtype == torch.bfloat16, "--dtype"),
        ("fp16.enabled", ds.setdefault("fp16", {}), "enabled", dtype == torch.float16, "--dtype"),
        ("optimizer.params.lr", params, "lr", config.lr, "--lr"),
        ("optimizer.params.weight_decay", params, "weight_decay", config.weight_decay, "--weight-decay"),
    ]
    overrides = []
    for where, node, key, value, flag in settings:
        if key in node and node[key] != value:
            overrides.append(f"{where} {node[key]!r} -> {value!r} ({flag})")
        node[key] = value
    for key, value, flag in (
        ("train_micro_batch_size_per_gpu", config.batch_size, "--batch-size"),
        ("gradient_accumulation_steps", config.grad_accum, "--grad-accum"),
    ):
        if ds.get(key) not in (None, "auto", value):  # initialize sets them from the flags
            overrides.append(f"{key} {ds[key]!r} -> {value!r} ({flag})")
    if device_type == "cpu" and optimizer["type"].lower() in ("adam", "adamw"):
        params["torch_adam"] = True
    return ds, overrides


class DeepSpeedEngine:
    """The run's flags set the batch keys, clipping, dtype and learning rate of ``ds_config``
    (docs/deepspeed.md; :func:`run_config`). ``load_universal`` prepares the engine to load a universal
    checkpoint (one converted to another world size)."""

    def __init__(
        self,
        model: torch.nn.Module,
        topology: SPTopology,
        ds_config: dict,
        config: TrainConfig,
        dtype: torch.dtype,
        device_type: str,
        load_universal: bool = False,
    ):
        ds, overrides = run_config(ds_config, config, dtype, device_type, load_universal)
        if overrides:
            logger.info("the flags replace values of the DeepSpeed config: %s", "; ".join(overrides))
        scheduler = None
        if "scheduler" not in ds:  # the torch engine's warmup + cosine, so both engines agree
            schedule = warmup_cosine(config.warmup_steps, config.steps)
            scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule)  # noqa: E731
        self.engine, self.optimizer, _, self.scheduler = ds_integration.initialize(
            CausalLMLoss(model, topology),
            topology,
            ds,
            lr_scheduler=scheduler,
            micro_batch_size=config.batch_size,
            gradient_accumulation_steps=config.grad_accum,
        )
        self.module = model
        self.topology = topology

    def forward_backward(self, local_batch, num_items) -> torch.Tensor:
        loss = self.engine(local_batch, num_items)
        # the loss is already normalised by the whole step's token count: no extra 1/accumulation
        self.engine.backward(loss, scale_wrt_gas=False)
        # DeepSpeed counts micro-batches in step() and updates only at the accumulation boundary: called
        # once per optimizer step instead, it would update every grad_accum-th step with grad_accum^2 micro-batches
        self.engine.step()
        return loss.detach()

    def step(self) -> float | None:
        """The update happened in the last micro-batch's ``engine.step()``; returns the gradient norm
        (None where DeepSpeed has none: stage 0)."""
        assert self.engine.micro_steps % self.engine.gradient_accumulation_steps() == 0, (
            "an optimizer step must end at DeepSpeed's accumulation boundary"
        )
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def loss_sum(self, local_batch) -> torch.Tensor:
        return self.engine(local_batch, 1)  # through the engine: ZeRO-3 gathers the parameters

    def set_train(self, mode: bool) -> None:
        self.engine.train(mode)

    def save(self, path: str) -> None:
        """DeepSpeed's own checkpoint (collective: every rank writes its ZeRO shards), with the info
        ``python -m deepspeed.checkpoint.ds_to_universal`` needs to convert it to another world size."""
        from deepspeed.checkpoint.constants import (
            UNIVERSAL_CHECKPOINT_INFO,
            UNIVERSAL_CHECKPOINT_VERSION_KEY,
            UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        )

        info = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
        self.engine.save_checkpoint(os.path.join(path, DEEPSPEED_DIR), tag=NATIVE_TAG, client_state=info)

    def load(self, path: str, tag: str = NATIVE_TAG) -> None:
        load_dir, _ = self.engine.load_checkpoint(
            os.path.join(path, DEEPSPEED_DIR), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_dir is None:
            raise ValueError(f"DeepSpeed found no checkpoint {tag!r} under {os.path.join(path, DEEPSPEED_DIR)}")
