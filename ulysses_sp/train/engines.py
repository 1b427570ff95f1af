"""Training engines for the trainer: plain torch (gradient all-reduce over all ranks) or DeepSpeed.

Both run :func:`ulysses_sp.loss.causal_lm_loss` (the SP group's loss, whose gradients summed over
the SP ranks are P x the reference) and end each optimizer step at the reference gradient:
 - TorchEngine averages gradients over all dp x sp ranks, which divides the P back out;
 - DeepSpeedEngine runs the loss inside the DeepSpeed engine's forward (ZeRO hooks see it) and
   lets DeepSpeed average over all dp x sp ranks too (integrations/deepspeed.py: SPMpu).
``forward_backward(local_batch, num_items)`` returns the micro-batch's (unscaled) loss;
``loss_sum(local_batch)`` the summed CE of the SP group's sequences for evaluation (call it under
``torch.no_grad()`` after ``set_train(False)``); ``save(path)`` / ``load(path, ...)`` write and read
the engine's part of a trainer checkpoint (ulysses_sp/checkpoint.py).
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..core import comm
from ..loss.causal_lm import CausalLMLoss, causal_lm_loss
from ..core.topology import SPTopology

_BUCKET_ELEMS = 1 << 25
#: the torch engine's file in a checkpoint directory: model, optimizer and scheduler state
TORCH_STATE_FILE = "torch_engine.pt"
#: the DeepSpeed engine's folder in a checkpoint directory, and the tags of its native / universal checkpoint
DEEPSPEED_DIR, NATIVE_TAG, UNIVERSAL_TAG = "deepspeed", "state", "universal"


class TorchEngine:
    """AdamW over the model's parameters; gradients averaged over the world after accumulation."""

    def __init__(self, model: torch.nn.Module, topology: SPTopology, lr: float, weight_decay: float = 0.0,
                 max_grad_norm: float = 0.0, warmup_steps: int = 0, total_steps: int = 1):
        self.module = model
        self.topology = topology
        self.max_grad_norm = max_grad_norm
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _warmup_cosine(warmup_steps, total_steps))
        self._sync_initial_weights()

    def _sync_initial_weights(self) -> None:
        # every rank built the model from the same seed; make it bit-identical anyway (rank 0 wins)
        with torch.no_grad():
            for p in self.module.parameters():
                p.copy_(comm.broadcast(p.detach(), src=0))

    def forward_backward(self, local_batch, num_items) -> torch.Tensor:
        loss = causal_lm_loss(self.module, local_batch, self.topology, num_items_in_batch=num_items)
        loss.backward()
        return loss.detach()

    def step(self) -> float:
        """All-reduce-average gradients over all ranks, clip, update; returns the gradient norm."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        world = self.topology.world_size
        if world > 1:
            for bucket in _buckets([p.grad for p in params]):
                flat = _flatten_dense_tensors(bucket)  # [sum numel]
                flat = comm.all_reduce(flat, None, op="avg")
                for g, new in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                    g.copy_(new)
        clip = self.max_grad_norm if self.max_grad_norm > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def loss_sum(self, local_batch) -> torch.Tensor:
        return causal_lm_loss(self.module, local_batch, self.topology, num_items_in_batch=1)

    def set_train(self, mode: bool) -> None:
        self.module.train(mode)

    def save(self, path: str) -> None:
        """Rank 0 writes the state: it is the same on every rank (any sp / dp can load it)."""
        if dist.get_rank() == 0:
            torch.save(self.state_dict(), os.path.join(path, TORCH_STATE_FILE))

    def load(self, path: str) -> None:
        self.load_state_dict(torch.load(os.path.join(path, TORCH_STATE_FILE), map_location="cpu", weights_only=True))


def _buckets(tensors: list[torch.Tensor]):
    bucket, size = [], 0
    for t in tensors:
        bucket.append(t)
        size += t.numel()
        if size >= _BUCKET_ELEMS:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def _warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


class DeepSpeedEngine:
    """``integrations.deepspeed.initialize`` over :class:`CausalLMLoss`: the loss runs inside the
    DeepSpeed engine's forward (ZeRO-3 hooks gather the head and the backbone there). The trainer's
    flags set the batch keys, clipping, dtype and learning rate (docs/deepspeed.md). ``load_universal``
    prepares the engine to load a universal checkpoint (one converted to another world size)."""

    def __init__(self, model: torch.nn.Module, topology: SPTopology, ds_config: dict, args, dtype: torch.dtype,
                 load_universal: bool = False):
        from ..integrations import deepspeed as ds_integration

        config = dict(ds_config)
        if load_universal:
            config["checkpoint"] = {**config.get("checkpoint", {}), "load_universal": True}
        config.pop("train_batch_size", None)  # recomputed from the flags: micro x accumulation x dp
        config["gradient_clipping"] = args.max_grad_norm
        config["bf16"] = {**config.get("bf16", {}), "enabled": dtype == torch.bfloat16}
        config["fp16"] = {**config.get("fp16", {}), "enabled": dtype == torch.float16}
        optimizer = config.setdefault("optimizer", {"type": "AdamW", "params": {}})
        optimizer.setdefault("params", {}).update(lr=args.lr, weight_decay=args.weight_decay)
        if args.device == "cpu" and optimizer["type"].lower() in ("adam", "adamw"):
            optimizer["params"]["torch_adam"] = True  # no JIT build of DeepSpeed's fused Adam on CPU
        scheduler = None
        if "scheduler" not in config:  # the torch engine's warmup + cosine, so both engines agree
            schedule = _warmup_cosine(args.warmup_steps, args.steps)
            scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule)  # noqa: E731
        self.engine, self.optimizer, _, self.scheduler = ds_integration.initialize(
            CausalLMLoss(model, topology), topology, config, lr_scheduler=scheduler,
            micro_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum)
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
        assert self.engine.micro_steps % self.engine.gradient_accumulation_steps() == 0, \
            "an optimizer step must end at DeepSpeed's accumulation boundary"
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
            UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY, UNIVERSAL_CHECKPOINT_VERSION_VALUE)

        info = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
        self.engine.save_checkpoint(os.path.join(path, DEEPSPEED_DIR), tag=NATIVE_TAG, client_state=info)

    def load(self, path: str, tag: str = NATIVE_TAG) -> None:
        load_dir, _ = self.engine.load_checkpoint(os.path.join(path, DEEPSPEED_DIR), tag=tag,
                                                  load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_dir is None:
            raise ValueError(f"DeepSpeed found no checkpoint {tag!r} under {os.path.join(path, DEEPSPEED_DIR)}")
