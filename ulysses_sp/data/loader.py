"""SPDataLoader: every rank of an SP group reads the same samples, then keeps only its shard.

Shape legend: B batch, S longest sample of the batch, s = S'/P local tokens (S' = S padded to a
multiple of P).

Sampling is keyed by the *dp* rank, so the P ranks of an SP group draw identical batches with no
communication, collate the same full batch and each cut its own shard
(:func:`ulysses_sp.sharding.shard_batch`, run inside the loader workers). A loader keyed by the
global rank instead hands each SP rank a different sample and the "shards" then mix samples
(DeepSpeed #7484); ``check_identical`` (here) or :class:`SPShardAdapter` (for your own loader)
catch that with one checksum gather per batch.

Resume is by index: the state is (epoch, batches seen); the loader rebuilds the epoch's index list
from (seed, epoch) and skips the consumed batches without loading them. The epoch's shuffled order
does not depend on the number of DP replicas, and batch ``i`` of all replicas together is the block
``[i*b*dp, (i+1)*b*dp)`` of it, so a state saved with another ``dp_size`` / ``batch_size`` maps to
the same position whenever ``b*dp`` of the new loader divides the samples consumed.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import DataLoader, DistributedSampler, default_collate

from ..core import comm
from .packing import PackedDataset, pack_collate
from ..core.sharding import shard_batch
from .text import BYTE_VOCAB_SIZE, Documents, decode_bytes, encode_bytes, load_text_dataset, read_documents

__all__ = [
    "BYTE_VOCAB_SIZE", "Documents", "PackedDataset", "SPBatchMismatchError", "SPDataLoader", "SPShardAdapter",
    "assert_same_across_sp", "batch_checksum", "collate_padded", "decode_bytes", "encode_bytes",
    "load_text_dataset", "pack_collate", "read_documents",
]

_STATE_CONFIG = ("seed", "shuffle", "batch_size", "drop_last", "dp_size", "num_samples")
_MUST_MATCH = ("seed", "shuffle", "drop_last", "num_samples")  # batch_size and dp_size map (module docstring)


def collate_padded(samples: list[dict], pad_token_id: int = 0, ignore_index: int = -100) -> dict:
    """Right-pad B samples to the longest, S: -> ``input_ids`` [B, S], ``labels`` [B, S], ...

    ``labels`` default to the input ids; padding gets ``pad_token_id`` in input_ids,
    ``ignore_index`` in labels, continued ``position_ids`` and 0 in any other per-token field (a
    value as long as the sample's input_ids). No attention mask is made: under causal attention no
    real token reads a later padding token, and padding is never a target, so the batch keeps the
    fastest (plain causal) kernel path. Other fields go through torch's ``default_collate``.
    """
    if not samples:
        raise ValueError("collate_padded got an empty batch")
    ids = [torch.as_tensor(x["input_ids"], dtype=torch.long).reshape(-1) for x in samples]
    lengths = [t.numel() for t in ids]
    S = max(lengths)
    if S == 0:
        raise ValueError("every sample of the batch is empty")
    batch = {}
    for key in samples[0]:
        values = ids if key == "input_ids" else [_per_token(x[key], n) for x, n in zip(samples, lengths)]
        if any(v is None for v in values):
            batch[key] = default_collate([x[key] for x in samples])
            continue
        fill = {"input_ids": pad_token_id, "labels": ignore_index}.get(key, 0)
        batch[key] = torch.stack([_pad_row(v, S, fill, continue_=key == "position_ids") for v in values])
    if "labels" not in batch:
        batch["labels"] = torch.stack([_pad_row(t, S, ignore_index) for t in ids])  # [B, S]
    return batch


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
        _compare_checksums(batch_checksum(batch), topology, where)


def _compare_checksums(crc: int, topology, where: str) -> None:
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


@dataclass(frozen=True)
class _CollateAndShard:
    """Runs in the loader workers: collate the full batch, checksum it, cut this rank's shard."""

    collate_fn: Callable
    sp_size: int
    sp_rank: int
    pad_token_id: int
    ignore_index: int
    checksum: bool

    def __call__(self, samples):
        full = self.collate_fn(samples)
        crc = batch_checksum(full) if self.checksum else None
        return shard_batch(full, self, pad_token_id=self.pad_token_id, ignore_index=self.ignore_index), crc


class SPDataLoader:
    """Batches of a map-style dataset for SP training: identical per SP group, disjoint across DP.

    Yields the local shards of :func:`ulysses_sp.sharding.shard_batch`. ``len()`` is the number of
    batches each DP rank gets per epoch. Iterating continues from the current position; finishing an
    epoch moves to the next one (a new shuffle), and :meth:`set_epoch` jumps to an epoch's start.
    ``state_dict`` / ``load_state_dict`` resume exactly mid-epoch: no sample skipped or repeated,
    and the consumed batches are not loaded again. Extra keyword arguments go to torch's DataLoader
    (e.g. ``pin_memory``, ``prefetch_factor``). The state is the same on every rank.
    """

    def __init__(self, dataset, topology, batch_size: int, *, collate_fn: Callable | None = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = True, num_workers: int = 0,
                 pad_token_id: int = 0, ignore_index: int = -100, check_identical: bool = False, **loader_kwargs):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.dataset = dataset
        self.topology = topology
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.num_workers = num_workers
        self.check_identical = check_identical
        self.loader_kwargs = loader_kwargs
        collate = collate_fn or functools.partial(collate_padded, pad_token_id=pad_token_id, ignore_index=ignore_index)
        self._collate = _CollateAndShard(collate, topology.sp_size, topology.sp_rank, pad_token_id, ignore_index,
                                         check_identical and topology.sp_size > 1)
        self.epoch = 0
        self.batches_seen = 0
        if len(self) == 0:
            raise ValueError(f"{len(dataset)} samples over dp_size={topology.dp_size} ranks make no batch of "
                             f"{batch_size} per rank (drop_last={drop_last}); use a smaller batch or more data")

    def _sampler(self, epoch: int) -> DistributedSampler:
        sampler = DistributedSampler(self.dataset, num_replicas=self.topology.dp_size, rank=self.topology.dp_rank,
                                     shuffle=self.shuffle, seed=self.seed, drop_last=self.drop_last)
        sampler.set_epoch(epoch)
        return sampler

    def __len__(self) -> int:
        n = len(self._sampler(0))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batch_indices(self, epoch: int | None = None) -> list[list[int]]:
        """Dataset indices of each batch this DP rank reads in ``epoch`` (default: the current one)."""
        indices = list(self._sampler(self.epoch if epoch is None else epoch))
        return [indices[i * self.batch_size:(i + 1) * self.batch_size] for i in range(len(self))]

    def set_epoch(self, epoch: int) -> None:
        """Go to the start of ``epoch``; the current epoch keeps its position (so a resumed run may call it)."""
        if epoch != self.epoch:
            self.epoch, self.batches_seen = epoch, 0

    def __iter__(self):
        epoch, start = self.epoch, self.batches_seen
        kwargs = dict(self.loader_kwargs)
        # torch's DataLoader draws its workers' base seed from the global torch stream unless given a
        # generator: every new iteration (an epoch, a resume, an evaluation pass) would shift the model's
        # dropout masks. Its own stream, from (seed, epoch, start), keeps the global one untouched.
        kwargs.setdefault("generator", torch.Generator().manual_seed(hash((self.seed, epoch, start)) & (2**63 - 1)))
        loader = DataLoader(self.dataset, batch_sampler=self.batch_indices(epoch)[start:], collate_fn=self._collate,
                            num_workers=self.num_workers, **kwargs)
        for i, (local, crc) in enumerate(loader, start):
            if crc is not None:
                _compare_checksums(crc, self.topology, f"epoch {epoch}, batch {i}")
            self.batches_seen = i + 1
            yield local
        if self.epoch == epoch:
            self.epoch, self.batches_seen = epoch + 1, 0

    def state_dict(self) -> dict:
        """Position plus the settings an exact resume depends on (identical on every rank)."""
        return {"epoch": self.epoch, "batches_seen": self.batches_seen, **self._config()}

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` stopped; it may come from a loader with another dp_size / batch_size.

        The position then maps through the samples all DP replicas consumed in the epoch
        (batches_seen x batch_size x dp_size), which must be a whole number of this loader's
        batch_size x dp_size: otherwise a ValueError, as for a different seed, shuffle, drop_last
        or dataset size. At the end of an epoch a new layout may drop a different remainder
        (drop_last): those samples are skipped, as a fresh run with this layout would.
        """
        mine = self._config()
        for key in _MUST_MATCH:
            if state.get(key) != mine[key]:
                raise ValueError(f"cannot resume exactly: the state was saved with {key}={state.get(key)!r}, "
                                 f"this loader has {key}={mine[key]!r}")
        batches = int(state["batches_seen"])
        if (state["batch_size"], state["dp_size"]) != (self.batch_size, self.topology.dp_size):
            consumed = batches * state["batch_size"] * state["dp_size"]
            per_batch = self.batch_size * self.topology.dp_size
            if consumed % per_batch:
                raise ValueError(
                    f"cannot map the data position: the state was saved {consumed} samples into epoch "
                    f"{state['epoch']} (batches_seen={batches} x batch_size={state['batch_size']} x "
                    f"dp_size={state['dp_size']}), not a multiple of this loader's batch_size={self.batch_size} x "
                    f"dp_size={self.topology.dp_size} = {per_batch}; choose a batch size with batch_size x dp_size "
                    f"dividing {consumed}, e.g. keep batch_size x dp_size = "
                    f"{state['batch_size'] * state['dp_size']} (the same global batch)")
            batches = min(consumed // per_batch, len(self))
        if not 0 <= batches <= len(self):
            raise ValueError(f"state has batches_seen={batches}, outside 0..{len(self)}")
        self.epoch, self.batches_seen = int(state["epoch"]), batches

    def _config(self) -> dict:
        values = dict(seed=self.seed, shuffle=self.shuffle, batch_size=self.batch_size, drop_last=self.drop_last,
                      dp_size=self.topology.dp_size, num_samples=len(self.dataset))
        return {k: values[k] for k in _STATE_CONFIG}


class SPShardAdapter:
    """Shard the full batches of your own loader: ``for local in SPShardAdapter(loader, topology)``.

    ``loader`` must give every rank of an SP group the same full batch (sample by dp rank);
    ``check_identical`` (default on: one small gather per batch) verifies it and names the ranks
    that differ, which catches a sampler keyed by the global rank on the first batch.
    """

    def __init__(self, loader, topology, *, check_identical: bool = True, pad_token_id: int = 0,
                 ignore_index: int = -100):
        self.loader = loader
        self.topology = topology
        self.check_identical = check_identical
        self.pad_token_id = pad_token_id
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for i, full in enumerate(self.loader):
            if self.check_identical:
                assert_same_across_sp(full, self.topology, f"batch {i}")
            yield shard_batch(full, self.topology, pad_token_id=self.pad_token_id, ignore_index=self.ignore_index)


def _per_token(value, n: int) -> torch.Tensor | None:
    """``value`` as a tensor when it has one entry per token (first dim ``n``), else None."""
    if isinstance(value, (str, bytes)):
        return None
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        return None
    return t if t.dim() >= 1 and t.shape[0] == n else None


def _pad_row(t: torch.Tensor, length: int, fill, continue_: bool = False) -> torch.Tensor:
    """[n, ...] -> [length, ...], appending ``fill`` (or, with ``continue_``, last + 1, + 2, ...)."""
    n = t.shape[0]
    if n == length:
        return t
    if continue_:
        last = t[-1] if n else torch.tensor(-1, dtype=t.dtype)
        return torch.cat([t, last + torch.arange(1, length - n + 1, dtype=t.dtype)])
    return torch.cat([t, t.new_full((length - n, *t.shape[1:]), fill)])
