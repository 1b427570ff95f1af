"""The fused seq<->head all-to-all: exact on labelled inputs (atol=0) for every head plan, and its
gradient is the inverse permutation (summed over replicas for replicated kv heads)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.distributed import harness
from ulysses_sp.core import all_to_all
from ulysses_sp.core.heads import plan_heads

# (Nq, Nkv, H, Hv, B, s): MHA, GQA with kv < P (replicated), MQA, uneven heads, MLA-like Hv != H
SHAPES = [
    (8, 8, 4, 4, 1, 3),
    (8, 2, 4, 4, 2, 3),
    (6, 1, 4, 4, 2, 2),
    (14, 2, 4, 4, 1, 2),
    (5, 5, 4, 4, 2, 3),
    (8, 8, 4, 2, 2, 3),
    (12, 4, 2, 2, 1, 1),
]


def _labelled(B, S, N, H, offset, device):
    # every element is unique, so any misplaced value is caught exactly
    return torch.arange(B * S * N * H, dtype=torch.float64, device=device).view(B, S, N, H) + offset


def _body_a2a(ctx):
    P, r, group = ctx.world_size, ctx.rank, dist.group.WORLD
    checked = 0
    for nq, nkv, H, Hv, B, s in SHAPES:
        if nq < P:
            continue
        plan = plan_heads(nq, nkv, P)
        S = P * s
        full = [
            _labelled(B, S, nq, H, 0, ctx.device),
            _labelled(B, S, nkv, H, 1e7, ctx.device),
            _labelled(B, S, nkv, Hv, 2e7, ctx.device),
        ]
        local = [t[:, r * s : (r + 1) * s].clone().requires_grad_(True) for t in full]
        q, k, v = all_to_all.seq_to_heads(local, [plan.q_heads, plan.kv_heads, plan.kv_heads], group, r)
        assert torch.equal(q, full[0][:, :, list(plan.q_heads[r])]), (nq, nkv)
        assert torch.equal(k, full[1][:, :, list(plan.kv_heads[r])]), (nq, nkv)
        assert torch.equal(v, full[2][:, :, list(plan.kv_heads[r])]), (nq, nkv)
        back = all_to_all.heads_to_seq(q, plan.q_heads, group, r)
        assert torch.equal(back, local[0]), "round trip is not the identity"
        # d/dx sum(f(x)^2) = 2x through a permutation; a kv head sent to m ranks gets m copies
        (q.pow(2).sum() + k.pow(2).sum() + v.pow(2).sum()).backward()
        assert torch.equal(local[0].grad, 2 * local[0].detach())
        copies = torch.zeros(nkv, dtype=torch.float64, device=ctx.device)
        for heads in plan.kv_heads:
            for h in heads:
                copies[h] += 1
        assert torch.equal(local[1].grad, 2 * local[1].detach() * copies.view(1, 1, -1, 1))
        assert torch.equal(local[2].grad, 2 * local[2].detach() * copies.view(1, 1, -1, 1))
        # the output direction's gradient as well
        out_local = local[0].detach().clone()
        o = all_to_all.seq_to_heads([out_local], [plan.q_heads], group, r)[0].requires_grad_(True)
        all_to_all.heads_to_seq(o, plan.q_heads, group, r).pow(2).sum().backward()
        assert torch.equal(o.grad, 2 * o.detach())
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("world", [2, 4])
def test_all_to_all_exact_and_gradient(world):
    harness.run(_body_a2a, world)
