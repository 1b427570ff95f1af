"""Every rank of an SP group must hold the same full batch: a checksum per batch, compared over the group.

A loader keyed by the global rank instead of the DP rank hands each SP rank a different sample, and
the "shards" then mix samples (DeepSpeed #7484): one small gather per batch names the ranks that differ.
"""

from __future__ import annotations

import zlib

import torch

from ..core import comm


def batch_checksum(batch: dict) -> int:
    """CRC32 over the keys, dtypes, shapes and bytes of a batch (non-tensors by their repr)."""
    crc = 0
    for key in sorted(batch):
        value = batch[key]
        crc = zlib.crc32(str(key).encode(), crc)
        if isinstance(value, torch.Tensor):
            flat = value.detach().to("cpu").contiguous().reshape(-1)
            crc = zlib.crc32(f"{value.dtype}{list(value.shape)}".encode(), crc)
            crc = zlib.crc32(flat.view(torch.uint8).numpy(), crc) if flat.numel() else crc
        else:
            crc = zlib.crc32(repr(value).encode(), crc)
    return crc


class SPBatchMismatchError(RuntimeError):
    """The ranks of an SP group hold different full batches."""


def assert_same_across_sp(batch: dict, topology, where: str = "") -> None:
    """Raise :class:`SPBatchMismatchError` on every rank of the SP group unless all hold ``batch``.

    One all-gather of a checksum over the SP group (a collective: every rank of the group must call).
    """
    if topology.sp_size > 1:
        compare_checksums(batch_checksum(batch), topology, where)


def compare_checksums(crc: int, topology, where: str) -> None:
    sums = comm.all_gather_object(crc, topology.sp_group)
    if len(set(sums)) == 1:
        return
    ranks = topology.sp_ranks()
    groups: dict[int, list[int]] = {}
    for rank, value in zip(ranks, sums):
        groups.setdefault(value, []).append(rank)
    seen = ", ".join(f"ranks {r} hold batch {value:#010x}" for value, r in groups.items())
    raise SPBatchMismatchError(
        f"the ranks {ranks} of one SP group (dp_rank {topology.dp_rank}) hold different full batches"
        f"{' at ' + where if where else ''}: {seen}. Every rank of an SP group must read the same samples: "
        f"sample by data-parallel rank (DistributedSampler(num_replicas=topology.dp_size, rank=topology.dp_rank)), "
        f"not by global rank (a loader keyed by global rank mixes samples across shards, DeepSpeed #7484), and "
        f"keep the dataset and collator free of per-rank randomness"
    )
