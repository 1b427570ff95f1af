"""SP/DP topology over a named 2-D DeviceMesh ("dp", "sp").

Global rank = dp_rank * sp_size + sp_rank: SP is the innermost mesh dimension, so an SP group is a
block of consecutive ranks and its all-to-alls stay inside one node when sp_size <= GPUs per node.
Nothing here is global state: every call to :func:`init_sp` builds its own groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch

from . import comm
from .checks import check_int
from .comm import Mesh, ProcessGroup


@dataclass(frozen=True)
class SPTopology:
    """Where this process sits in the (dp, sp) grid, with the process groups of both dimensions.

    ``sp_group`` holds the ranks that share one sequence (each keeps S/P tokens of it); ``dp_group``
    holds the ranks with the same ``sp_rank`` across data-parallel replicas. With ``sp_size == 1``
    every SP operation is the identity.
    """

    mesh: Mesh
    sp_size: int
    sp_rank: int
    sp_group: ProcessGroup
    dp_size: int
    dp_rank: int
    dp_group: ProcessGroup

    @property
    def world_size(self) -> int:
        return self.sp_size * self.dp_size

    @property
    def rank(self) -> int:
        return self.dp_rank * self.sp_size + self.sp_rank

    @property
    def device_type(self) -> str:
        return self.mesh.device_type

    def sp_ranks(self) -> list[int]:
        """Global ranks of this process's SP group, in sp_rank order."""
        return [self.dp_rank * self.sp_size + r for r in range(self.sp_size)]

    def __repr__(self) -> str:
        return (
            f"SPTopology(rank={self.rank}/{self.world_size}, sp={self.sp_rank}/{self.sp_size}, "
            f"dp={self.dp_rank}/{self.dp_size}, device_type={self.device_type!r})"
        )


def _mesh_device_type() -> str:
    backend = comm.backend()
    if "nccl" in backend:
        return "cuda"
    if backend == "gloo":
        return "cpu"
    # e.g. "cpu:gloo,cuda:nccl": prefer the accelerator when one is present
    return "cuda" if "cuda" in backend and torch.cuda.is_available() else "cpu"


def init_sp(sp_size: int, *, device_type: str | None = None, timeout: timedelta | None = None) -> SPTopology:
    """Build the SP/DP topology for ``sp_size``; ``dp_size = world_size // sp_size``.

    torch.distributed must already be initialised (gloo or NCCL). This is a collective call: every
    rank must call it with the same ``sp_size``. ``device_type`` defaults to "cuda" for NCCL and
    "cpu" for gloo. ``timeout`` is the collective timeout of the new sp/dp groups, by default the
    world group's (torch would give them the backend default, 30 min on gloo, so a stalled rank
    would hold the job that long whatever ``init_process_group(timeout=...)`` said).
    """
    if not comm.is_initialized():
        raise RuntimeError(
            "ulysses_sp.init_sp needs torch.distributed initialised first: call "
            "torch.distributed.init_process_group('nccl' or 'gloo') (torchrun/deepspeed set the env vars)"
        )
    check_int("sp_size", sp_size)
    world = comm.world_size()
    if world % sp_size != 0:
        valid = [d for d in range(1, world + 1) if world % d == 0]
        raise ValueError(
            f"world size {world} is not a multiple of sp_size={sp_size}; "
            f"use one of {valid} (dp_size = world_size / sp_size)"
        )
    dp_size = world // sp_size
    mesh = comm.device_mesh(device_type or _mesh_device_type(), (dp_size, sp_size), ("dp", "sp"))
    timeout = timeout or comm.group_timeout(comm.world_group())
    if timeout is not None:
        for name in ("sp", "dp"):
            if mesh.get_group(name) is not comm.world_group():
                comm.set_group_timeout(mesh.get_group(name), timeout)
    return SPTopology(
        mesh=mesh,
        sp_size=sp_size,
        sp_rank=mesh.get_local_rank("sp"),
        sp_group=mesh.get_group("sp"),
        dp_size=dp_size,
        dp_rank=mesh.get_local_rank("dp"),
        dp_group=mesh.get_group("dp"),
    )
