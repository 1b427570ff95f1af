"""The torch engine: AdamW over the model's parameters, gradients averaged over the world after the
micro-batches of a step (which divides out the P of the SP group's loss, see engines/__init__.py)."""

from __future__ import annotations

import math
import os

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ...core import comm
from ...core.topology import SPTopology
from ...loss.causal_lm import causal_lm_loss
from . import TORCH_STATE_FILE, warmup_cosine

_BUCKET_ELEMS = 1 << 25


class TorchEngine:
    """AdamW over the model's parameters; gradients averaged over the world after accumulation."""

    def __init__(
        self,
        model: torch.nn.Module,
        topology: SPTopology,
        lr: float,
        weight_decay: float = 0.0,
        max_grad_norm: float = 0.0,
        warmup_steps: int = 0,
        total_steps: int = 1,
    ):
        self.module = model
        self.topology = topology
        self.max_grad_norm = max_grad_norm
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(warmup_steps, total_steps))
        comm.broadcast_parameters(model)

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
        if self.topology.world_size > 1:
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
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

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
        if comm.rank() == 0:
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
