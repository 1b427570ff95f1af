"""Which attention heads each SP rank computes: pure logic, no tensors, no communication.

Query heads are split into P contiguous, balanced ranges (uneven when N % P != 0: the first
N % P ranks get one more). Each rank then needs the key/value heads its query heads read (GQA):
 - N_kv divisible by P and aligned with the query split: plain split, no replication;
 - N_kv < P (MQA/GQA with few kv heads): a kv head is sent to every rank whose query heads use it,
   i.e. replicated only as often as needed (P / N_kv times when that divides);
 - anything irregular: one kv head per local query head (group 1), which is always correct.
Uneven counts across ranks are fine: the all-to-all then runs with per-rank split sizes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HeadPlan:
    """Head assignment of one attention call shape (num_q, num_kv) over the SP ranks.

    ``q_heads[r]`` / ``kv_heads[r]`` are the global head indices rank ``r`` receives (q heads are a
    contiguous range; kv indices may repeat across ranks when replicated).
    """

    q_heads: tuple[tuple[int, ...], ...]
    kv_heads: tuple[tuple[int, ...], ...]

    def q_slice(self, rank: int) -> slice:
        """The query heads of ``rank`` as a slice of the head dim (they are a contiguous range)."""
        return slice(self.q_heads[rank][0], self.q_heads[rank][-1] + 1)


def plan_heads(num_q: int, num_kv: int, sp: int) -> HeadPlan:
    """Plan the head split of ``num_q`` query / ``num_kv`` kv heads over ``sp`` ranks."""
    if num_kv < 1 or num_q % num_kv != 0:
        raise ValueError(f"num_attention_heads={num_q} must be a multiple of num_key_value_heads={num_kv}")
    if sp > num_q:
        raise ValueError(
            f"sp_size={sp} exceeds num_attention_heads={num_q}: every SP rank needs at least one "
            f"query head. Use sp_size <= {num_q}, or ring attention for the rest (init_sp(sp_size, "
            f"ring_size={smallest_ring(sp, num_q)}) runs Ulysses over sp_size / ring_size ranks)."
        )
    group = num_q // num_kv
    base, extra = divmod(num_q, sp)
    q_heads, kv_heads = [], []
    start = 0
    for r in range(sp):
        count = base + (1 if r < extra else 0)
        q = tuple(range(start, start + count))
        start += count
        needed = [j // group for j in q]
        unique = sorted(set(needed))
        # GQA works locally when every kv head this rank needs serves the same number of its q heads
        uniform = all(needed.count(u) == len(q) // len(unique) for u in unique) and len(q) % len(unique) == 0
        kv_heads.append(tuple(unique) if uniform else tuple(needed))
        q_heads.append(q)
    return HeadPlan(q_heads=tuple(q_heads), kv_heads=tuple(kv_heads))


def smallest_ring(sp_size: int, num_q: int, ranks_per_node: int | None = None) -> int:
    """The smallest ring size r (a divisor of ``sp_size``) whose Ulysses groups of u = sp_size / r
    ranks each get at least one of ``num_q`` query heads and, given ``ranks_per_node``, fit a node
    (u divides it: Ulysses groups are consecutive ranks, so each then lies inside one node)."""
    return next(
        r
        for r in range(1, sp_size + 1)
        if sp_size % r == 0
        and sp_size // r <= num_q
        and (ranks_per_node is None or ranks_per_node % (sp_size // r) == 0)
    )
