"""SP/DP topology over a named DeviceMesh: ("dp", "sp"), or ("dp", "ring", "ulysses") for hybrid SP.

Global rank = dp_rank * sp_size + sp_rank: SP is the innermost mesh dimension, so an SP group is a
block of consecutive ranks and its all-to-alls stay inside one node when sp_size <= GPUs per node.
With a ring (``ring_size`` r > 1) an SP group of sp = r * u ranks is r Ulysses groups of u consecutive
ranks (sp_rank = ring_rank * u + ulysses_rank, Ulysses innermost so its all-to-all stays inside a
node); the ring group links the ranks of equal ulysses_rank across them (P2P, ring attention).
Nothing here is global state: every call to :func:`init_sp` builds its own groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch

from . import comm
from .checks import check_int
from .comm import Mesh, ProcessGroup
from .layout import ring_size_of


@dataclass(frozen=True)
class SPTopology:
    """Where this process sits in the (dp, sp) grid, with the process groups of both dimensions.

    ``sp_group`` holds the ranks that share one sequence (each keeps S/P tokens of it); ``dp_group``
    holds the ranks with the same ``sp_rank`` across data-parallel replicas. With ``sp_size == 1``
    every SP operation is the identity.

    Hybrid SP (``ring_size > 1``): ``sp_group`` is still the whole SP group (ring x ulysses: the
    loss, the data path, the RNG and the sharding work over it); ``ulysses_group`` (``sp_size /
    ring_size`` consecutive ranks) runs the all-to-all and ``ring_group`` (``ring_size`` ranks, one
    per Ulysses group) passes K/V blocks. With ``ring_size == 1`` the Ulysses group is the SP group.
    """

    mesh: Mesh
    sp_size: int
    sp_rank: int
    sp_group: ProcessGroup
    dp_size: int
    dp_rank: int
    dp_group: ProcessGroup
    ring_size: int = 1
    ring_group: ProcessGroup | None = None
    ulysses_group: ProcessGroup | None = None  # None: the SP group (no ring)

    def __post_init__(self):
        if self.ulysses_group is None:
            object.__setattr__(self, "ulysses_group", self.sp_group)

    @property
    def ulysses_size(self) -> int:
        return self.sp_size // self.ring_size

    @property
    def ulysses_rank(self) -> int:
        return self.sp_rank % self.ulysses_size

    @property
    def ring_rank(self) -> int:
        return self.sp_rank // self.ulysses_size

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
        ring = (
            ""
            if self.ring_size == 1
            else f", ring={self.ring_rank}/{self.ring_size}, ulysses={self.ulysses_rank}/{self.ulysses_size}"
        )
        return (
            f"SPTopology(rank={self.rank}/{self.world_size}, sp={self.sp_rank}/{self.sp_size}{ring}, "
            f"dp={self.dp_rank}/{self.dp_size}, device_type={self.device_type!r})"
        )


def ulysses_of(topology) -> tuple[int, int, ProcessGroup | None]:
    """(size, rank, group) of the all-to-all: the SP group's own without a ring."""
    if ring_size_of(topology) == 1:
        return topology.sp_size, topology.sp_rank, getattr(topology, "sp_group", None)
    return topology.ulysses_size, topology.ulysses_rank, topology.ulysses_group


def _mesh_device_type() -> str:
    backend = comm.backend()
    if "nccl" in backend:
        return "cuda"
    if backend == "gloo":
        return "cpu"
    # e.g. "cpu:gloo,cuda:nccl": prefer the accelerator when one is present
    return "cuda" if "cuda" in backend and torch.cuda.is_available() else "cpu"


def init_sp(
    sp_size: int, ring_size: int = 1, *, device_type: str | None = None, timeout: timedelta | None = None
) -> SPTopology:
    """Build the SP/DP topology for ``sp_size``; ``dp_size = world_size // sp_size``.

    ``ring_size`` > 1 makes hybrid SP: ``sp_size / ring_size`` ranks run Ulysses (all-to-all, inside
    a node) and ``ring_size`` such groups run ring attention between them; ``ring_size == sp_size``
    is pure ring attention. torch.distributed must already be initialised (gloo or NCCL). This is a
    collective call: every rank must call it with the same sizes. ``device_type`` defaults to "cuda"
    for NCCL and "cpu" for gloo. ``timeout`` is the collective timeout of the new groups, by default
    the world group's (torch would give them the backend default, 30 min on gloo, so a stalled rank
    would hold the job that long whatever ``init_process_group(timeout=...)`` said).
    """
    if not comm.is_initialized():
        raise RuntimeError(
            "ulysses_sp.init_sp needs torch.distributed initialised first: call "
            "torch.distributed.init_process_group('nccl' or 'gloo') (torchrun/deepspeed set the env vars)"
        )
    check_int("sp_size", sp_size)
    if ring_size == "auto":
        raise ValueError(
            "init_sp(ring_size='auto'): the ring size follows the model's heads; resolve it first with "
            "ulysses_sp.integrations.sp_size.resolve_ring_size('auto', sp_size, model) (prepare_sp, SPTrainer "
            "and launch/train.py take 'auto' themselves)"
        )
    check_int("ring_size", ring_size)
    if sp_size % ring_size != 0:
        valid = [d for d in range(1, sp_size + 1) if sp_size % d == 0]
        raise ValueError(
            f"sp_size={sp_size} is not a multiple of ring_size={ring_size}: the SP group is ring_size "
            f"Ulysses groups of sp_size / ring_size ranks; use a ring_size in {valid}"
        )
    world = comm.world_size()
    if world % sp_size != 0:
        valid = [d for d in range(1, world + 1) if world % d == 0]
        raise ValueError(
            f"world size {world} is not a multiple of sp_size={sp_size}; "
            f"use one of {valid} (dp_size = world_size / sp_size)"
        )
    dp_size = world // sp_size
    device_type = device_type or _mesh_device_type()
    if ring_size == 1:
        mesh = comm.device_mesh(device_type, (dp_size, sp_size), ("dp", "sp"))
        sp_mesh = mesh
    else:
        mesh = comm.device_mesh(device_type, (dp_size, ring_size, sp_size // ring_size), ("dp", "ring", "ulysses"))
        sp_mesh = comm.flatten_mesh(mesh, ("ring", "ulysses"), "sp")
    timeout = timeout or comm.group_timeout(comm.world_group())
    names = ("sp", "dp") if ring_size == 1 else ("dp", "ring", "ulysses")
    groups = {name: mesh.get_group(name) for name in names}
    groups["sp"] = sp_mesh.get_group("sp")
    if timeout is not None:
        for group in groups.values():
            if group is not comm.world_group():
                comm.set_group_timeout(group, timeout)
    return SPTopology(
        mesh=mesh,
        sp_size=sp_size,
        sp_rank=sp_mesh.get_local_rank("sp"),
        sp_group=groups["sp"],
        dp_size=dp_size,
        dp_rank=mesh.get_local_rank("dp"),
        dp_group=groups["dp"],
        ring_size=ring_size,
        ring_group=groups.get("ring"),
        ulysses_group=groups.get("ulysses"),
    )
