"""SPDataLoader: every rank of an SP group reads the same samples, then keeps only its shard.

Shape legend: B batch, S longest sample of the batch, s = S'/P local tokens (S' = S padded to a
multiple of P).

Sampling is keyed by the *dp* rank, so the P ranks of an SP group draw identical batches with no
communication, collate the same full batch and each cut its own shard
(:func:`ulysses_sp.shard_batch`, run inside the loader workers). A loader keyed by the
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
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, DistributedSampler

from ..core.checks import check_int
from ..core.layout import ring_size_of
from ..core.sharding import shard_batch
from .collate import collate_padded
from .identical import assert_same_across_sp, batch_checksum, compare_checksums

_STATE_CONFIG = ("seed", "shuffle", "batch_size", "drop_last", "dp_size", "num_samples")
_MUST_MATCH = ("seed", "shuffle", "drop_last", "num_samples")  # batch_size and dp_size map (module docstring)


@dataclass(frozen=True)
class _CollateAndShard:
    """Runs in the loader workers: collate the full batch, checksum it, cut this rank's shard."""

    collate_fn: Callable
    sp_size: int
    sp_rank: int
    pad_token_id: int
    ignore_index: int
    checksum: bool
    ring_size: int = 1  # the token layout follows the ring's (shard_batch reads it)
    vlm: bool = False

    def __call__(self, samples):
        full = self.collate_fn(samples)
        crc = batch_checksum(full) if self.checksum else None
        local = shard_batch(full, self, pad_token_id=self.pad_token_id, ignore_index=self.ignore_index, vlm=self.vlm)
        return local, crc


class SPDataLoader:
    """Batches of a map-style dataset for SP training: identical per SP group, disjoint across DP.

    Yields the local shards of :func:`ulysses_sp.shard_batch`. ``len()`` is the number of
    batches each DP rank gets per epoch. Iterating continues from the current position; finishing an
    epoch moves to the next one (a new shuffle), and :meth:`set_epoch` jumps to an epoch's start.
    ``state_dict`` / ``load_state_dict`` resume exactly mid-epoch: no sample skipped or repeated,
    and the consumed batches are not loaded again. Extra keyword arguments go to torch's DataLoader
    (e.g. ``pin_memory``, ``prefetch_factor``). The state is the same on every rank.

    ``vlm=True`` for a Qwen2.5-VL / Qwen3-VL model: the samples' images (``pixel_values``,
    ``image_grid_thw``, ...) are concatenated (``collate_padded``, ``pack_collate``) and every rank
    gets the whole batch with its shard's ``shift_labels`` (``shard_batch(..., vlm=True)``); call the
    model, or :func:`ulysses_sp.causal_lm_loss`, with it as it comes (docs/vlm.md).
    """

    def __init__(
        self,
        dataset,
        topology,
        batch_size: int,
        *,
        collate_fn: Callable | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        num_workers: int = 0,
        pad_token_id: int = 0,
        ignore_index: int = -100,
        check_identical: bool = False,
        vlm: bool = False,
        **loader_kwargs,
    ):
        check_int("batch_size", batch_size)
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
        self._collate = _CollateAndShard(
            collate,
            topology.sp_size,
            topology.sp_rank,
            pad_token_id,
            ignore_index,
            check_identical and topology.sp_size > 1,
            ring_size_of(topology),
            vlm,
        )
        self.epoch = 0
        self.batches_seen = 0
        if len(self) == 0:
            raise ValueError(
                f"{len(dataset)} samples over dp_size={topology.dp_size} ranks make no batch of "
                f"{batch_size} per rank (drop_last={drop_last}); use a smaller batch or more data"
            )

    def _sampler(self, epoch: int) -> DistributedSampler:
        sampler = DistributedSampler(
            self.dataset,
            num_replicas=self.topology.dp_size,
            rank=self.topology.dp_rank,
            shuffle=self.shuffle,
            seed=self.seed,
            drop_last=self.drop_last,
        )
        sampler.set_epoch(epoch)
        return sampler

    def __len__(self) -> int:
        n = len(self._sampler(0))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batch_indices(self, epoch: int | None = None) -> list[list[int]]:
        """Dataset indices of each batch this DP rank reads in ``epoch`` (default: the current one)."""
        indices = list(self._sampler(self.epoch if epoch is None else epoch))
        return [indices[i * self.batch_size : (i + 1) * self.batch_size] for i in range(len(self))]

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
        loader = DataLoader(
            self.dataset,
            batch_sampler=self.batch_indices(epoch)[start:],
            collate_fn=self._collate,
            num_workers=self.num_workers,
            **kwargs,
        )
        for i, (local, crc) in enumerate(loader, start):
            if crc is not None:
                compare_checksums(crc, self.topology, f"epoch {epoch}, batch {i}")
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
                raise ValueError(
                    f"cannot resume exactly: the state was saved with {key}={state.get(key)!r}, "
                    f"this loader has {key}={mine[key]!r}"
                )
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
                    f"{state['batch_size'] * state['dp_size']} (the same global batch)"
                )
            batches = min(consumed // per_batch, len(self))
        if not 0 <= batches <= len(self):
            raise ValueError(f"state has batches_seen={batches}, outside 0..{len(self)}")
        self.epoch, self.batches_seen = int(state["epoch"]), batches

    def _config(self) -> dict:
        values = dict(
            seed=self.seed,
            shuffle=self.shuffle,
            batch_size=self.batch_size,
            drop_last=self.drop_last,
            dp_size=self.topology.dp_size,
            num_samples=len(self.dataset),
        )
        return {k: values[k] for k in _STATE_CONFIG}


class SPShardAdapter:
    """Shard the full batches of your own loader: ``for local in SPShardAdapter(loader, topology)``.

    ``loader`` must give every rank of an SP group the same full batch (sample by dp rank);
    ``check_identical`` (default on: one small gather per batch) verifies it and names the ranks
    that differ, which catches a sampler keyed by the global rank on the first batch. ``vlm=True``: the
    batches of a vision-language model (see :class:`SPDataLoader`).
    """

    def __init__(
        self,
        loader,
        topology,
        *,
        check_identical: bool = True,
        pad_token_id: int = 0,
        ignore_index: int = -100,
        vlm: bool = False,
    ):
        self.loader = loader
        self.topology = topology
        self.check_identical = check_identical
        self.pad_token_id = pad_token_id
        self.ignore_index = ignore_index
        self.vlm = vlm

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for i, full in enumerate(self.loader):
            if self.check_identical:
                assert_same_across_sp(full, self.topology, f"batch {i}")
            yield shard_batch(
                full, self.topology, pad_token_id=self.pad_token_id, ignore_index=self.ignore_index, vlm=self.vlm
            )
