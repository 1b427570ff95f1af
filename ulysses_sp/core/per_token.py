"""Per-token tensors between this rank's shard and the full rows of its SP group.

Shape legend: B batch, S full (padded) sequence, s = S/P local tokens, L the rows' length before
padding (L <= S), ``...`` trailing dims.

RL bookkeeping happens on full rollouts (rewards, advantages, masks per completion), training on
shards: :func:`gather_tokens` turns a shard's per-token values (log-probs, entropies) into the
group's full rows, :func:`shard_tokens` cuts a full per-token tensor (advantages, masks) into this
rank's shard exactly as :func:`ulysses_sp.shard_batch` cuts ``input_ids``.
"""

from __future__ import annotations

import torch

from . import comm
from .layout import padded_length, ring_size_of, take_local, to_sequence_order
from .topology import SPTopology


def gather_tokens(local: torch.Tensor, topology: SPTopology, length: int | None = None) -> torch.Tensor:
    """[B, s, ...] shard -> [B, S, ...] full rows in sequence order (``length``: the rows' length before
    padding, to drop it: [B, L, ...]). A collective over the SP group; no autograd (bookkeeping)."""
    full = local.detach()
    if topology.sp_size > 1:
        full = comm.all_gather(local.contiguous(), topology.sp_group, dim=1)  # [B, S, ...] in layout order
        full = to_sequence_order(full, 1, ring_size_of(topology))  # [B, S, ...]
    if length is not None:
        if not 0 < length <= full.shape[1]:
            raise ValueError(f"length must be in 1..{full.shape[1]} (the gathered rows' length), got {length}")
        full = full[:, :length]  # [B, L, ...]
    return full


def shard_tokens(full: torch.Tensor, topology: SPTopology, fill=0) -> torch.Tensor:
    """[B, L, ...] full rows -> [B, s, ...] this rank's shard: padded with ``fill`` as shard_batch pads
    the tokens (a multiple of sp_size, 2 * sp_size with a ring), then sliced. Pure tensor logic."""
    P, L, ring = topology.sp_size, full.shape[1], ring_size_of(topology)
    S = padded_length(L, P, ring)
    if S > L:
        pad = full.new_full((full.shape[0], S - L, *full.shape[2:]), fill)
        full = torch.cat([full, pad], dim=1)  # [B, S, ...]
    return take_local(full, 1, P, ring, topology.sp_rank)  # [B, s, ...]
