"""The FSDP2 engine of the ``ours`` and ``hf`` sides (``--engine fsdp2``): torch's ``fully_shard`` per
decoder layer and a root, fp32 master shards computed in the workload's dtype (``param_dtype``),
fp32 gradient reduce-scatter, torch AdamW with the DeepSpeed config's learning rate, no weight decay
and clipping at 1.0, so that it matches the DeepSpeed engine the other configurations run under.

``ours`` is sharded by ``ulysses_sp.integrations.fsdp2.shard_causal_lm`` (what ``launch/train.py
--fsdp`` does); ``hf`` the way a plain transformers user shards it: each decoder layer, then the model.
"""

from __future__ import annotations

import torch

from ulysses_sp.core import comm
from ulysses_sp.integrations.fsdp2 import decoder_layers

from .workload import GRADIENT_CLIPPING, Workload


class Fsdp2Optimizer:
    """AdamW over a sharded module's parameters, with the DeepSpeed config's clipping."""

    def __init__(self, module: torch.nn.Module, workload: Workload):
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=workload.lr, weight_decay=0.0)
        self.grad_norm: torch.Tensor | None = None  # of the last step, before clipping

    def step(self) -> None:
        self.grad_norm = comm.full_tensor(torch.nn.utils.clip_grad_norm_(self.params, GRADIENT_CLIPPING))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def shard_plain(model: torch.nn.Module, workload: Workload) -> torch.nn.Module:
    """A plain transformers model sharded per decoder layer, then at its root (the rest)."""
    mesh = comm.device_mesh(workload.device.type, (comm.world_size(),), ("fsdp",))
    for layer in reversed(decoder_layers(model)):
        comm.fully_shard(
            layer, mesh, reshard_after_forward=True, param_dtype=workload.dtype, reduce_dtype=torch.float32
        )
    comm.fully_shard(model, mesh, reshard_after_forward=False, param_dtype=workload.dtype, reduce_dtype=torch.float32)
    return model
