"""Ring attention's pure parts: the load-balanced layout (round trip, labels, positions through
shard_batch) and the block kernel with the lse merge against brute-force attention, on one process
(every ring rank simulated): outputs and q/k/v gradients, for causal, packed, padded, windowed, GQA."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ulysses_sp.core import layout, ring
from ulysses_sp.core.backends import block
from ulysses_sp.core.per_token import shard_tokens
from ulysses_sp.core.sequence_info import SEQ_INFO_KWARG, SequenceInfo, build_sequence_info
from ulysses_sp.core.sharding import make_shift_labels, shard_batch

from .ring_sim import CASES, brute, make_info, simulated_ring


@pytest.mark.parametrize("sp,r", [(2, 2), (4, 2), (4, 4), (6, 3), (4, 1)])
def test_layout_round_trip_and_balance(sp, r):
    S = layout.padded_length(37, sp, r)
    assert S % layout.pad_multiple(sp, r) == 0 and S - 37 < layout.pad_multiple(sp, r)
    order = layout.layout_order(S, r)
    assert sorted(order.tolist()) == list(range(S))
    parts = [layout.local_index(S, sp, r, p) for p in range(sp)]
    assert torch.equal(torch.cat(parts), order)
    x = torch.arange(S).view(1, S) * 10
    shards = [layout.take_local(x, 1, sp, r, p) for p in range(sp)]
    assert torch.equal(layout.to_sequence_order(torch.cat(shards, 1), 1, r), x)  # gather -> sequence order
    # ring rank i holds chunks i and 2r-1-i: every ring rank sees the same number of causal pairs
    u, c = sp // r, S // (2 * r)
    work = []
    for i in range(r):
        mine = torch.cat(parts[i * u : (i + 1) * u])
        lo, hi = layout.ring_chunks(i, r)
        assert torch.equal(mine, torch.cat([torch.arange(lo * c, lo * c + c), torch.arange(hi * c, hi * c + c)]))
        work.append(int((mine + 1).sum()))
    assert len(set(work)) == 1


def test_shard_batch_follows_the_layout_labels_shifted_before():
    B, S, sp, r = 2, 13, 4, 2  # S' = 16: 3 padding tokens
    ids = torch.arange(1, B * S + 1).view(B, S)
    batch = {"input_ids": ids, "labels": ids.clone(), "seq_lens": [[5, 8], [13]]}
    shards = [shard_batch(batch, SimpleNamespace(sp_size=sp, sp_rank=p, ring_size=r)) for p in range(sp)]
    S2 = 16
    cat = lambda key: layout.to_sequence_order(torch.cat([s[key] for s in shards], 1), 1, r)  # noqa: E731
    plain = [shard_batch(batch, SimpleNamespace(sp_size=sp, sp_rank=p)) for p in range(sp)]  # no ring: S' = 16 too
    for key in ("input_ids", "position_ids", "shift_labels"):
        assert torch.equal(cat(key), torch.cat([s[key] for s in plain], 1)), key
    starts = torch.zeros(B, S, dtype=torch.bool)
    starts[0, 5] = True
    assert torch.equal(cat("shift_labels")[:, :S], make_shift_labels(ids, starts))  # no label crosses a document
    info = shards[0][SEQ_INFO_KWARG]
    assert info.seq_len == S2 and torch.equal(info.doc_ids, plain[0][SEQ_INFO_KWARG].doc_ids)  # sequence order
    for p, sh in enumerate(shards):
        assert torch.equal(sh["position_ids"][1], layout.local_index(S2, sp, r, p))  # global positions


def test_shard_tokens_cuts_like_shard_batch():
    """RL's per-token tensors (advantages, masks) are cut in the ring's layout, as the tokens are."""
    ids = torch.arange(1, 2 * 13 + 1).view(2, 13)
    for p in range(4):
        topo = SimpleNamespace(sp_size=4, sp_rank=p, ring_size=2)
        assert torch.equal(shard_tokens(ids, topo), shard_batch({"input_ids": ids}, topo)["input_ids"])


@pytest.mark.parametrize("layout_kind,causal,window,r", CASES)
def test_ring_blocks_merge_to_brute_force(layout_kind, causal, window, r):
    B, nq, nk, H, S = 2, 4, 2, 8, 24
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, n, S, H, generator=g, dtype=torch.float64).float() for n in (nq, nk, nk))
    info = make_info(layout_kind, B, S)
    do = torch.randn(B, nq, S, H, generator=torch.Generator().manual_seed(3))
    got, grads = simulated_ring(block, q, k, v, info, causal, window, 0.3, r, do)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    want = brute(qq, kk, vv, info, causal, window, 0.3)
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
    want.backward(do)
    for name, a, b in zip("qkv", grads, (qq, kk, vv)):
        torch.testing.assert_close(a, b.grad, rtol=1e-5, atol=1e-5, msg=lambda m: f"d{name}: {m}")


def test_pairs_skip_by_position_only():
    info = SequenceInfo(16)  # r = 2, c = 4: ring rank 0 holds chunks 0, 3; rank 1 chunks 1, 2
    same = ring._pairs(block, info, True, None, 0, 0, 2, 4, "cpu")
    assert len(same) == 3  # (0,0) diagonal, (3,0) full, (3,3) diagonal; (0,3) is in the future
    assert [m is None for _, _, m in same] == [False, True, False]
    assert len(ring._pairs(block, info, True, None, 0, 1, 2, 4, "cpu")) == 2  # chunk 3 reads chunks 1 and 2
    assert len(ring._pairs(block, info, True, 2, 0, 1, 2, 4, "cpu")) == 1  # window 2: only (3, 2) is near enough
    docs = build_sequence_info(torch.cat([torch.arange(6), torch.arange(10)]).view(1, 16))  # 6 + 10 tokens
    assert len(ring._pairs(block, docs, True, None, 0, 1, 2, 4, "cpu")) == 2  # (3, 1) and (3, 2): same document
    assert len(ring._pairs(block, docs, True, None, 0, 0, 2, 4, "cpu")) == 2  # (3, 0) reads nothing: chunk 0 is doc 0
