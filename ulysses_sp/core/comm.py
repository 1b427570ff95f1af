"""Every collective ulysses_sp runs. Nothing else in the package talks to torch.distributed.

Shape legend: B batch, S full sequence, s = S/P local tokens, P = sp_size, N heads of a projection
(Nq query, Nkv key/value), n heads this rank owns after the all-to-all, H head dim, D = n*H.

The differentiable collectives are torch's functional collectives (``all_to_all_single_autograd``
and friends): they trace under ``torch.compile(fullgraph=True)`` and their backward is the inverse
collective. An ``autograd.Function`` that fills a pre-allocated buffer gave silent zero gradients
under compile in DeepSpeed (#8491); functional collectives do not have that hazard.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol



# torch >= 2.13 names the dim-0 all-gathers *_single; older releases call them *_tensor
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
_all_gather_autograd = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd


def _wait(t: torch.Tensor) -> torch.Tensor:
    # Functional collectives return AsyncCollectiveTensor outside compile; materialise so callers can
    # view/split the result freely.
    return funcol.wait_tensor(t) if isinstance(t, funcol.AsyncCollectiveTensor) else t


def all_to_all(
    x: torch.Tensor,
    group: dist.ProcessGroup,
    out_splits: list[int] | None = None,
    in_splits: list[int] | None = None,
) -> torch.Tensor:
    """Differentiable all-to-all over dim 0: chunk ``r`` of ``x`` goes to rank ``r`` of ``group``."""
    return _wait(funcol.all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group))


def all_gather(x: torch.Tensor, group: dist.ProcessGroup, dim: int = 0) -> torch.Tensor:
    """All-gather of equally shaped tensors, concatenated along ``dim`` in rank order. No autograd."""
    out = _wait(_all_gather(x.detach().contiguous(), 0, group))  # [P * x.shape[0], ...]
    if dim != 0:
        out = torch.cat(out.chunk(dist.get_world_size(group), dim=0), dim=dim)
    return out


def all_gather_autograd(x: torch.Tensor, group: dist.ProcessGroup, dim: int = 0) -> torch.Tensor:
    """Differentiable all-gather along ``dim``; the backward reduce-scatters (sums) the gradient."""
    out = _wait(_all_gather_autograd(x.contiguous(), 0, group))  # [P * x.shape[0], ...]
    if dim != 0:
        out = torch.cat(out.chunk(dist.get_world_size(group), dim=0), dim=dim)
    return out


def all_reduce(x: torch.Tensor, group: dist.ProcessGroup | None, op: str = "sum") -> torch.Tensor:
    """Out-of-place all-reduce (``op``: sum, max, min, avg) over ``group`` (None: the world). No autograd."""
    group = group if group is not None else dist.group.WORLD
    x = x.detach()  # torch >= 2.13 collectives carry autograd; these helpers never should
    if op == "avg":  # gloo has no AVG
        return _wait(funcol.all_reduce(x, "sum", group)) / dist.get_world_size(group)
    return _wait(funcol.all_reduce(x, op, group))


def broadcast(x: torch.Tensor, src: int = 0, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Out-of-place broadcast of ``x`` from global rank ``src``. No autograd."""
    return _wait(funcol.broadcast(x.detach().contiguous(), src, group if group is not None else dist.group.WORLD))


def all_reduce_autograd_sum(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Differentiable sum over the group: forward all-reduce, backward all-reduce of the gradient.

    The backward sums the upstream gradients of every rank, which is right when each rank's
    upstream gradient is its own share of a loss (see loss.py for the gradient convention).
    """
    return _SumAllReduce.apply(x, group)


class _SumAllReduce(torch.autograd.Function):
    # Out-of-place functional collectives on both passes (never writes into a saved buffer).
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _wait(funcol.all_reduce(x, "sum", group))

    @staticmethod
    def backward(ctx, grad):
        return _wait(funcol.all_reduce(grad.contiguous(), "sum", ctx.group)), None


def self_group() -> dist.ProcessGroup:
    """A process group holding only this rank. Collective: every rank must call it (each gets its own)."""
    group, _ = dist.new_subgroups(group_size=1)
    return group


def group_timeout(group: dist.ProcessGroup | None = None) -> timedelta | None:
    """The collective timeout of ``group`` (None: the world's), or None when the backend does not say."""
    group = group if group is not None else dist.group.WORLD
    for device in ("cpu", "cuda"):
        try:
            return group._get_backend(torch.device(device)).options._timeout
        except (RuntimeError, AttributeError):
            continue
    return None


def set_group_timeout(group: dist.ProcessGroup, timeout: timedelta) -> None:
    """Set the collective timeout of ``group``. torch gives a new group the backend's default (30 min
    for gloo, 10 for NCCL), not the timeout the world group was created with."""
    dist.distributed_c10d._set_pg_timeout(timeout, group)


def set_all_group_timeouts(timeout: timedelta) -> None:
    """Give every process group of this process the collective timeout ``timeout`` (groups made by
    libraries, e.g. DeepSpeed, get the backend default otherwise)."""
    for group in list(dist.distributed_c10d._world.pg_map):
        set_group_timeout(group, timeout)


def barrier(group: dist.ProcessGroup | None = None) -> None:
    dist.barrier(group=group)


def broadcast_object(obj, src: int = 0, group: dist.ProcessGroup | None = None):
    """Broadcast a picklable object from global rank ``src`` (setup-time only, not for hot paths)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_gather_object(obj, group: dist.ProcessGroup | None = None) -> list:
    """Gather one picklable object per rank (setup/debug checks only)."""
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


# --- Ulysses re-sharding -----------------------------------------------------------------------


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
    group: dist.ProcessGroup,
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
        recv = all_to_all(send, group)  # [P(src = seq chunk), B, s, n_all, H]
        parts = recv.split([c[rank] for c in counts], dim=3)  # [P, B, s, n_i, H] each
    else:
        sizes = [sum(B * s * c[r] * t.shape[3] for c, t in zip(counts, tensors)) for r in range(P)]
        send = torch.cat([_select(t, plan[r]) for r in range(P) for t, plan in zip(tensors, plans)])  # [sum_r B*s*D_r]
        recv = all_to_all(send, group, out_splits=[sizes[rank]] * P, in_splits=sizes)  # [P * B*s*D_me]
        # each source's chunk is tensor 0's heads, then tensor 1's, ... each [B, s, n_i, H_i] flattened
        widths = [B * s * c[rank] * t.shape[3] for c, t in zip(counts, tensors)]
        parts = [
            p.reshape(P, B, s, c[rank], t.shape[3])  # [P(src), B, s, n_i, H_i]
            for p, c, t in zip(recv.view(P, -1).split(widths, dim=1), counts, tensors)
        ]
    return [p.permute(1, 0, 2, 3, 4).flatten(1, 2) for p in parts]  # [B, S, n_i, H_i]


def heads_to_seq(
    x: torch.Tensor, q_plan: tuple[tuple[int, ...], ...], group: dist.ProcessGroup, rank: int
) -> torch.Tensor:
    """Inverse of :func:`seq_to_heads` for the attention output: [B, S, n, H] -> [B, s, Nq, H]."""
    P = len(q_plan)
    B, S, n, H = x.shape
    s = S // P
    send = x.unflatten(1, (P, s)).permute(1, 0, 2, 3, 4)  # [P(dst = seq chunk), B, s, n, H]
    counts = [len(h) for h in q_plan]
    if len(set(counts)) == 1:
        recv = all_to_all(send, group)  # [P(src = head group), B, s, n, H]
        return recv.permute(1, 2, 0, 3, 4).reshape(B, s, P * n, H)  # [B, s, Nq, H]
    sizes = [B * s * c * H for c in counts]
    recv = all_to_all(send.reshape(-1), group, out_splits=sizes, in_splits=[B * s * n * H] * P)  # [sum_r B*s*n_r*H]
    return torch.cat([c.view(B, s, -1, H) for c in recv.split(sizes)], dim=2)  # [B, s, Nq, H]
