"""The Ulysses re-sharding: local tokens with all heads <-> all tokens with this rank's heads.

Shape legend: B batch, S full sequence, s = S/P local tokens, P = sp_size, N heads of a projection
(Nq query, Nkv key/value), n heads this rank owns after the all-to-all, H head dim, D = n*H.

One fused all-to-all carries q, k and v together (:func:`seq_to_heads`); which heads go to which
rank is a head plan (heads.py), uneven splits and replicated kv heads included. The collective
itself is :func:`ulysses_sp.core.comm.all_to_all` (differentiable, compile-safe).
"""

from __future__ import annotations

import torch

from . import comm
from .comm import ProcessGroup


def _per_rank(t: torch.Tensor, heads: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """[B, s, N, H] -> [P, B, s, n, H] (equal n per rank): a view for a plain split, else a gather."""
    P, n = len(heads), len(heads[0])
    flat = [h for hs in heads for h in hs]
    if flat != list(range(t.shape[2])):
        t = t.index_select(2, torch.tensor(flat, device=t.device))  # [B, s, P*n, H] (replicated kv)
    return t.unflatten(2, (P, n)).permute(2, 0, 1, 3, 4)  # [P, B, s, n, H] view


def _select(t: torch.Tensor, heads: tuple[int, ...]) -> torch.Tensor:
    """[B, s, N, H] -> [B*s*n*H] for one destination rank (uneven path)."""
    lo = heads[0]
    if heads == tuple(range(lo, lo + len(heads))):
        return t[:, :, lo : lo + len(heads)].reshape(-1)  # [B*s*n*H]
    return t.index_select(2, torch.tensor(heads, device=t.device)).reshape(-1)  # [B*s*n*H]


def seq_to_heads(
    tensors: list[torch.Tensor],
    plans: list[tuple[tuple[int, ...], ...]],
    group: ProcessGroup,
    rank: int,
) -> list[torch.Tensor]:
    """One fused all-to-all: local tokens with all heads -> all tokens with this rank's heads.

    ``tensors[i]``: [B, s, N_i, H_i] (any strides); ``plans[i][r]``: heads of tensor i sent to rank r.
    Returns one [B, S, n_i, H_i] per tensor, n_i = len(plans[i][rank]), S = P * s in rank order.
    With B == 1 the outputs are views of the receive buffer (no copy after the collective).
    """
    P = len(plans[0])
    B, s = tensors[0].shape[:2]
    counts = [[len(plan[r]) for r in range(P)] for plan in plans]
    even = all(len(set(c)) == 1 for c in counts)
    same_dim = len({t.shape[3] for t in tensors}) == 1
    if even and same_dim:
        send = torch.cat([_per_rank(t, plan) for t, plan in zip(tensors, plans)], dim=3)  # [P, B, s, n_all, H]
        recv = comm.all_to_all(send, group)  # [P(src = seq chunk), B, s, n_all, H]
        parts = recv.split([c[rank] for c in counts], dim=3)  # [P, B, s, n_i, H] each
    else:
        sizes = [sum(B * s * c[r] * t.shape[3] for c, t in zip(counts, tensors)) for r in range(P)]
        send = torch.cat([_select(t, plan[r]) for r in range(P) for t, plan in zip(tensors, plans)])  # [sum_r B*s*D_r]
        recv = comm.all_to_all(send, group, out_splits=[sizes[rank]] * P, in_splits=sizes)  # [P * B*s*D_me]
        # each source's chunk is tensor 0's heads, then tensor 1's, ... each [B, s, n_i, H_i] flattened
        widths = [B * s * c[rank] * t.shape[3] for c, t in zip(counts, tensors)]
        parts = [
            p.reshape(P, B, s, c[rank], t.shape[3])  # [P(src), B, s, n_i, H_i]
            for p, c, t in zip(recv.view(P, -1).split(widths, dim=1), counts, tensors)
        ]
    return [p.permute(1, 0, 2, 3, 4).flatten(1, 2) for p in parts]  # [B, S, n_i, H_i]


def heads_to_seq(x: torch.Tensor, q_plan: tuple[tuple[int, ...], ...], group: ProcessGroup, rank: int) -> torch.Tensor:
    """Inverse of :func:`seq_to_heads` for the attention output: [B, S, n, H] -> [B, s, Nq, H]."""
    P = len(q_plan)
    B, S, n, H = x.shape
    s = S // P
    send = x.unflatten(1, (P, s)).permute(1, 0, 2, 3, 4)  # [P(dst = seq chunk), B, s, n, H]
    counts = [len(h) for h in q_plan]
    if len(set(counts)) == 1:
        recv = comm.all_to_all(send, group)  # [P(src = head group), B, s, n, H]
        return recv.permute(1, 2, 0, 3, 4).reshape(B, s, P * n, H)  # [B, s, Nq, H]
    sizes = [B * s * c * H for c in counts]
    recv = comm.all_to_all(
        send.reshape(-1), group, out_splits=sizes, in_splits=[B * s * n * H] * P
    )  # [sum_r B*s*n_r*H]
    return torch.cat([c.view(B, s, -1, H) for c in recv.split(sizes)], dim=2)  # [B, s, Nq, H]
