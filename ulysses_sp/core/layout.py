"""Which tokens of the full (padded) sequence each SP rank holds: pure index logic, no communication.

Shape legend: S' the padded full sequence, P = sp_size, r = ring_size, u = P / r Ulysses ranks per
ring rank, s = S'/P local tokens, c = S'/(2r) tokens per chunk.

Without a ring (r = 1) SP rank p holds tokens [p*s, (p+1)*s), as always.

With a ring, causal attention on contiguous parts would idle the first ring ranks (their queries
read few keys) while the last ones read everything. The load-balanced ("zigzag") layout cuts S' into
2r chunks and gives ring rank i chunks i and 2r-1-i, in that order: every ring rank then does the
same work at every ring step. The u Ulysses ranks of ring rank i split its 2c tokens in order, s
each, exactly as they split a plain sequence (so after their all-to-all each holds its ring rank's
2c tokens). In "layout order" (the ranks' tokens concatenated in sp_rank order) the sequence is

    chunk 0, chunk 2r-1, chunk 1, chunk 2r-2, ..., chunk r-1, chunk r

so S' must be a multiple of 2P (2r chunks, each ring rank's 2c tokens split u ways).
"""

from __future__ import annotations

import torch


def ring_size_of(topology) -> int:
    """``topology.ring_size``; 1 for a topology-like object without one (sp_size/sp_rank only)."""
    return getattr(topology, "ring_size", 1)


def pad_multiple(sp_size: int, ring_size: int = 1) -> int:
    """The multiple S' is padded to: P without a ring, 2P with one."""
    return sp_size if ring_size == 1 else 2 * sp_size


def padded_length(seq_len: int, sp_size: int, ring_size: int = 1) -> int:
    """S -> S', the smallest multiple of :func:`pad_multiple` >= S."""
    m = pad_multiple(sp_size, ring_size)
    return -(-seq_len // m) * m


def ring_chunks(ring_rank: int, ring_size: int) -> tuple[int, int]:
    """The two chunks (of 2r) ring rank ``ring_rank`` holds, in its order."""
    return ring_rank, 2 * ring_size - 1 - ring_rank


def layout_order(seq_len: int, ring_size: int, device=None) -> torch.Tensor:
    """[S'] int64: the global position of each token in layout order (identity without a ring)."""
    if ring_size == 1:
        return torch.arange(seq_len, device=device)
    if seq_len % (2 * ring_size):
        raise ValueError(f"a ring of {ring_size} needs a sequence length divisible by {2 * ring_size}, got {seq_len}")
    chunks = torch.arange(seq_len, device=device).view(2 * ring_size, -1)  # [2r, c]
    order = [c for i in range(ring_size) for c in ring_chunks(i, ring_size)]
    return chunks[order].reshape(-1)  # [S']


def local_index(seq_len: int, sp_size: int, ring_size: int, sp_rank: int, device=None) -> torch.Tensor:
    """[s] int64: the global positions SP rank ``sp_rank`` holds, in its order."""
    s = seq_len // sp_size
    return layout_order(seq_len, ring_size, device).narrow(0, sp_rank * s, s)


def take_local(t: torch.Tensor, dim: int, sp_size: int, ring_size: int, sp_rank: int) -> torch.Tensor:
    """A full (padded) per-token tensor -> this rank's tokens along ``dim`` (a narrow view without a ring)."""
    S = t.shape[dim]
    if ring_size == 1:
        s = S // sp_size
        return t.narrow(dim, sp_rank * s, s)
    return t.index_select(dim, local_index(S, sp_size, ring_size, sp_rank, t.device))


def to_sequence_order(t: torch.Tensor, dim: int, ring_size: int) -> torch.Tensor:
    """A tensor gathered in layout (rank) order along ``dim`` -> sequence order (no-op without a ring)."""
    if ring_size == 1:
        return t
    inverse = torch.argsort(layout_order(t.shape[dim], ring_size, t.device))  # [S']
    return t.index_select(dim, inverse)


def check_local_length(local_len: int, sp_size: int, ring_size: int) -> None:
    """ValueError when shards of ``local_len`` tokens cannot form the ring layout."""
    total = local_len * sp_size
    if ring_size > 1 and total % (2 * sp_size):
        raise ValueError(
            f"ring attention (ring_size={ring_size}) needs the full sequence ({sp_size} ranks x {local_len} "
            f"tokens = {total}) to be a multiple of 2 * sp_size = {2 * sp_size} (two mirrored chunks per ring "
            "rank); cut the batch with ulysses_sp.shard_batch, which pads it so"
        )
