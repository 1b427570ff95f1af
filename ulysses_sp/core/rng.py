"""Random streams under sequence parallelism: synced for replicated work, per rank for shards.

Policy:

* **Replicated ops** — anything every rank of an SP group must compute identically: which samples
  to read and in what order, whole-sample augmentation, weight init, any draw outside the model's
  forward on sharded tensors — use the *synced* streams set by :func:`sync_rng`: python ``random``,
  numpy and torch (CPU and every CUDA device) identical on the P ranks of an SP group and different
  across DP groups (each DP group reads different data, so it gets its own stream).
* **Sharded ops** — random ops on tensors that differ per SP rank: dropout on the local tokens
  [B, s, D], attention dropout on this rank's heads [B, n, S, S] — run inside
  :func:`sharded_rng`, which gives each SP rank its own torch stream (CPU and the current CUDA
  device). With the synced stream instead, all P ranks would draw the same mask for different
  tokens / heads: correlated dropout, a silent change of the model's regularisation.

``sharded_rng`` derives the per-rank seed from one draw of the synced CPU stream and the sp_rank,
so it is deterministic, differs from step to step (each entry advances the synced stream by one
draw, identically on every rank of the group), and on exit restores the synced streams as they
were after that draw: they stay identical across the SP group. ``torch.utils.checkpoint`` (and
transformers' gradient checkpointing) stashes the RNG state at the checkpointed forward and
restores it for the recompute, so a layer run inside ``sharded_rng`` gets the same masks when it is
recomputed in the backward, outside the context. Python ``random`` and numpy are not forked: the
model's sharded ops draw from torch only.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from .checks import check_int
from .topology import SPTopology

_SEED_MASK = (1 << 63) - 1


def derive_seed(*words: int) -> int:
    """A well-spread 63-bit seed from integers (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence(list(words)).generate_state(1, np.uint64)[0]) & _SEED_MASK


def sync_rng(topology: SPTopology, seed: int) -> int:
    """Seed python ``random``, numpy and torch (CPU, all CUDA devices) identically within this SP
    group and differently across DP groups; returns the seed used (from ``seed`` and dp_rank)."""
    check_int("seed", seed, minimum=0)
    derived = derive_seed(seed, topology.dp_rank)
    random.seed(derived)
    np.random.seed(derived & 0xFFFF_FFFF)
    torch.manual_seed(derived)  # CPU and every CUDA device
    return derived


@contextmanager
def sharded_rng(topology: SPTopology) -> Iterator[int]:
    """Per-SP-rank torch stream (CPU and the current CUDA device) for ops on sharded tensors.

    Wrap the model's forward on the local shard: ``with sharded_rng(topo): loss = ...``. Yields the
    per-rank seed. Call ``torch.cuda.set_device`` before the first use on GPU (the current device's
    state is saved).
    """
    draw = int(torch.randint(0, 1 << 62, ()))  # one draw of the synced CPU stream, the same on the SP group
    cpu_state = torch.get_rng_state()
    cuda = torch.cuda.is_available()
    cuda_state = torch.cuda.get_rng_state() if cuda else None
    seed = derive_seed(draw, topology.sp_rank)
    torch.random.default_generator.manual_seed(seed)
    if cuda:
        torch.cuda.manual_seed(seed)
    try:
        yield seed
    finally:
        torch.set_rng_state(cpu_state)
        if cuda:
            torch.cuda.set_rng_state(cuda_state)


def get_rng_state() -> dict:
    """This process's random streams (python, numpy, torch CPU and every CUDA device), for a checkpoint.

    Plain tensors, tuples and numbers only, so ``torch.load(weights_only=True)`` reads it back.
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the streams of :func:`get_rng_state` (CUDA only when both sides have the same devices)."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
