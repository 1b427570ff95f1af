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
from ulysses_sp.integrations.deepspeed import destroy
from ulysses_sp.integrations.fsdp2 import decoder_layers

from .workload import GRADIENT_CLIPPING, Workload


class Fsdp2Engine:
    """An FSDP2-sharded module under AdamW, driven by the calls the sides make on a DeepSpeed engine:
    ``engine(...)``, ``backward``, ``step``, ``get_global_grad_norm``."""

    def __init__(self, module: torch.nn.Module, workload: Workload):
        self.module = module
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=workload.lr, weight_decay=0.0)
        self.grad_norm: torch.Tensor | None = None  # of the last step, before clipping

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor, **deepspeed_options) -> None:
        """``loss.backward()``; DeepSpeed's loss-scaling options do not apply (FSDP2 averages over its mesh)."""
        loss.backward()

    def step(self) -> None:
        self.grad_norm = comm.full_tensor(torch.nn.utils.clip_grad_norm_(self.params, GRADIENT_CLIPPING))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_global_grad_norm(self) -> torch.Tensor | None:
        return self.grad_norm


def release(engine) -> None:
    """Free a side's engine: a DeepSpeed engine through ``destroy`` (it drops what DeepSpeed keeps
    referencing); an FSDP2 engine holds nothing beyond its own references."""
    if not isinstance(engine, Fsdp2Engine):
        destroy(engine)


def shard_plain(model: torch.nn.Module, workload: Workload) -> torch.nn.Module:
    """A plain transformers model sharded per decoder layer, then at its root (the rest)."""
    mesh = comm.device_mesh(workload.device.type, (comm.world_size(),), ("fsdp",))
    for layer in reversed(decoder_layers(model)):
        comm.fully_shard(
            layer, mesh, reshard_after_forward=True, param_dtype=workload.dtype, reduce_dtype=torch.float32
        )
    comm.fully_shard(model, mesh, reshard_after_forward=False, param_dtype=workload.dtype, reduce_dtype=torch.float32)
    return model
