"""The FSDP2 engine: :func:`ulysses_sp.integrations.fsdp2.shard_causal_lm` over the model, AdamW over
the DTensor shards, run checkpoints by torch.distributed.checkpoint (readable at any world size)."""

from __future__ import annotations

import math
import os

import torch

from ...core import comm
from ...core.topology import SPTopology
from ...integrations.fsdp2 import FSDP2_CHECKPOINT_DIR, shard_causal_lm
from . import warmup_cosine


class FSDP2Engine:
    """Parameters, gradients and AdamW state sharded over all ranks; each micro-batch's gradients are
    reduce-scattered as they are made (their world mean is the reference gradient, fsdp2.py)."""

    def __init__(
        self,
        model: torch.nn.Module,
        topology: SPTopology,
        lr: float,
        *,
        compute_dtype: torch.dtype = torch.float32,
        reshard_after_forward: bool = True,
        weight_decay: float = 0.0,
        max_grad_norm: float = 0.0,
        warmup_steps: int = 0,
        total_steps: int = 1,
    ):
        self.module = model
        self.topology = topology
        self.max_grad_norm = max_grad_norm
        self.loss_module = shard_causal_lm(
            model,
            topology,
            reshard_after_forward=reshard_after_forward,
            param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
            reduce_dtype=torch.float32,
        )
        self.optimizer = torch.optim.AdamW(self.loss_module.parameters(), lr=lr, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(warmup_steps, total_steps))

    def forward_backward(self, local_batch, num_items) -> torch.Tensor:
        loss = self.loss_module(local_batch, num_items)
        loss.backward()
        return loss.detach()

    def step(self) -> float:
        """Clip (the norm of the sharded gradients, over all ranks), update; returns the gradient norm."""
        params = [p for p in self.loss_module.parameters() if p.requires_grad]
        clip = self.max_grad_norm if self.max_grad_norm > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(comm.full_tensor(norm))

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def loss_sum(self, local_batch) -> torch.Tensor:
        return self.loss_module(local_batch, 1)  # through the FSDP root: the units gather their parameters

    def set_train(self, mode: bool) -> None:
        self.loss_module.train(mode)

    def _state(self) -> dict:
        state = comm.sharded_state(self.loss_module, self.optimizer)
        state["scheduler"] = self.scheduler.state_dict()
        return state

    def save(self, path: str) -> None:
        """Every rank writes its shards (collective)."""
        comm.save_sharded(self._state(), os.path.join(path, FSDP2_CHECKPOINT_DIR))

    def load(self, path: str) -> None:
        """Read a checkpoint of any world size, resharded to this one (collective)."""
        state = self._state()
        comm.load_sharded(state, os.path.join(path, FSDP2_CHECKPOINT_DIR))
        comm.load_sharded_state(self.loss_module, self.optimizer, state)
        self.scheduler.load_state_dict(state["scheduler"])
