"""The ring's flex and flash block kernels on CPU, every ring rank simulated on one process
(ring_sim.py): the schedule, the pair masks of each kernel and the lse merge against brute-force
attention, for causal and bidirectional attention, packed documents, padding, GQA and windows
shorter and longer than a ring chunk.

- flex: its forward (torch has no flex backward on CPU); its backward's formula (the gradient of
  the merged output through the merge weights, ``block_flex.backward_through_merge``) with the torch
  kernel's differentiable forward in flex's place, against brute force. Flex's own backward: the
  GPU test (test_ring_kernels_cuda.py).
- flash: flash-attn is GPU-only, so its two varlen entry points are replaced by a CPU reference of
  what flash-attn 2 computes for one varlen call (flash_reference.py), fp32 inside. This checks the
  segments, windows, index maps and merges; the real kernel against the torch kernel: the GPU test.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ulysses_sp.core import ring
from ulysses_sp.core.backends import block, block_flash, block_flex, flex
from ulysses_sp.core.backends.spec import AttnSpec

from . import flash_reference
from .ring_sim import CASES, brute, make_info, one_rank_group, ring_of_one, simulated_ring

#: flash refuses a window across padding inside a row (block_flash.check)
FLASH_CASES = [case for case in CASES if not (case[0] == "padded" and case[2] is not None)]


def _inputs(B=2, nq=4, nk=2, H=8, S=24, Hv=None):
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(B, n, S, H, generator=g, dtype=torch.float64).float() for n in (nq, nk))
    v = torch.randn(B, nk, S, Hv or H, generator=g, dtype=torch.float64).float()
    do = torch.randn(B, nq, S, Hv or H, generator=g, dtype=torch.float64).float()
    return q, k, v, do


def _reference(q, k, v, do, info, causal, window, scale):
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    want = brute(qq, kk, vv, info, causal, window, scale)
    want.backward(do)
    return want.detach(), (qq.grad, kk.grad, vv.grad)


def _assert_close(got, got_grads, want, want_grads, rows=None, tol=1e-5):
    """Outputs (on ``rows`` [B, S] bool of queries, all if None) and q/k/v gradients."""
    pick = (lambda t: t) if rows is None else (lambda t: t.transpose(1, 2)[rows])
    torch.testing.assert_close(pick(got), pick(want), rtol=tol, atol=tol)
    for name, a, b in zip("qkv", got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"d{name}: {m}")


#: flex's (eager on CPU, slow) subset: a plain causal batch (full pairs: no BlockMask), packed, padded,
#: windows shorter and longer than a chunk, bidirectional with a window
FLEX_CASES = [CASES[i] for i in (0, 2, 3, 4, 5, 9)]


@pytest.mark.parametrize("layout_kind,causal,window,r", FLEX_CASES)
def test_flex_block_kernel_forward(layout_kind, causal, window, r):
    q, k, v, _ = _inputs()
    info = make_info(layout_kind, 2, 24)
    got, _ = simulated_ring(block_flex, q, k, v, info, causal, window, 0.3, r)
    torch.testing.assert_close(got, brute(q, k, v, info, causal, window, 0.3), rtol=1e-5, atol=1e-5)


def test_compiled_flex_keeps_compiling_past_dynamos_default_limit(monkeypatch):
    """The mask kinds of FLEX_CASES and two more lengths are more compiled variants than dynamo's default
    limit (8 per code object), past which it would run flex eagerly (dense [S, S] scores on a GPU).
    Our compiled flex (here on dynamo's eager backend: its guards and recompiles, no Inductor) keeps
    compiling each variant, and each result is the brute-force one."""
    from torch._dynamo.utils import counters
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.reset()
    counters.clear()
    fn = flex.compiled(flex_attention, dynamic=False, backend="eager")
    monkeypatch.setattr(flex, "flex_function", lambda device: fn)
    for (layout_kind, causal, window, r), S in [(case, 24) for case in FLEX_CASES] + [(CASES[0], 32), (CASES[0], 40)]:
        q, k, v, _ = _inputs(S=S)
        info = make_info(layout_kind, 2, S)
        got, _ = simulated_ring(block_flex, q, k, v, info, causal, window, 0.3, r)
        torch.testing.assert_close(got, brute(q, k, v, info, causal, window, 0.3), rtol=1e-5, atol=1e-5)
    frames = counters["frames"]
    assert frames["total"] > 8 and frames["ok"] == frames["total"], dict(frames)  # more variants than 8, all compiled
    assert not any("recompile limit" in reason for reason in counters["unimplemented"]), dict(counters["unimplemented"])
    torch._dynamo.reset()


def _through_merge(q, k, v, mask, scale, do, out, lse, delta):
    return block_flex.backward_through_merge(lambda *qkv: block.forward(*qkv, mask, scale), q, k, v, do, lse, delta)


@pytest.mark.parametrize("layout_kind,causal,window,r", CASES)
def test_backward_through_the_merge_weights(layout_kind, causal, window, r):
    """flex's backward formula, with the torch kernel's forward differentiated in flex's place."""
    q, k, v, do = _inputs()
    info = make_info(layout_kind, 2, 24)
    kernel = SimpleNamespace(
        __name__="through_merge", pair_mask=block.pair_mask, forward=block.forward, backward=_through_merge
    )
    got, grads = simulated_ring(kernel, q, k, v, info, causal, window, 0.3, r, do)
    _assert_close(got, grads, *_reference(q, k, v, do, info, causal, window, 0.3))


@pytest.fixture
def reference_flash():
    with flash_reference.installed():
        yield


@pytest.mark.parametrize("layout_kind,causal,window,r", FLASH_CASES)
def test_flash_block_kernel_segments(reference_flash, layout_kind, causal, window, r):
    """Valid queries' outputs and every gradient (padding queries read nothing on flash; their
    output gradient is 0, as in training, where no loss reads them)."""
    q, k, v, do = _inputs(Hv=6)  # head dim 8, values 6 (MLA-like: padded to 8 inside)
    info = make_info(layout_kind, 2, 24)
    valid = torch.ones(2, 24, dtype=torch.bool) if info.key_valid is None else info.key_valid
    do = do * valid[:, None, :, None]
    got, grads = simulated_ring(block_flash, q, k, v, info, causal, window, 0.3, r, do)
    _assert_close(got, grads, *_reference(q, k, v, do, info, causal, window, 0.3), rows=valid)
    assert not got.transpose(1, 2)[~valid].any()  # padding queries: 0


def test_flash_plans_skip_and_cut_segments():
    """The plan of one pair: no call where documents share nothing; a window cuts queries beyond
    its reach; a plain batch's plan repeats over the rows."""
    docs = make_info("packed", 1, 24)  # documents [0, 7), [7, 18), [18, 24)
    calls, empty = block_flash.pair_mask(docs, True, None, range(18, 24), range(0, 6), "cpu")
    assert empty and calls == []
    calls, _ = block_flash.pair_mask(docs, True, None, range(12, 18), range(6, 12), "cpu")
    (call,) = calls  # document 1 only: queries 12..17 read keys 7..11, in full
    assert call.q_rows.tolist() == list(range(6)) and call.k_rows.tolist() == list(range(1, 6))
    assert (call.causal, call.left, call.right) == (False, -1, -1)
    plain = block_flash.pair_mask(make_info("plain", 2, 24), True, 3, range(12, 18), range(6, 12), "cpu")[0]
    (call,) = plain  # window 3: only queries 12, 13 reach key 11
    assert call.q_rows.tolist() == [0, 1] and call.k_rows.tolist() == list(range(6))
    assert (call.left, call.right) == (0, -1)  # kb - qb + w - 1 on the global ends 12 and 14
    rows, _, cu_q, cu_k, m = call.on(3, 6, "cpu")
    assert rows.tolist() == [0, 1, 6, 7, 12, 13] and cu_q.tolist() == [0, 2, 4, 6] and cu_k.tolist() == [0, 6, 12, 18]
    assert m == 6


def _spec(info, causal, window):
    return AttnSpec(causal=causal, scale=0.3, dropout=0.0, window=window, softcap=None, info=info, custom_mask=None)


def test_refusals_before_any_collective():
    """flash: a window across padding inside a document; flex on CPU: training (torch has no CPU
    flex backward); both from ``ring.check_supported``, which runs before the call's first collective."""
    gapped = make_info("padded", 2, 24)  # row 1 has padding inside its sequence
    assert gapped.gapped
    q = torch.zeros(2, 4, 6, 8, requires_grad=True)
    spec = _spec(gapped, True, 5)
    with pytest.raises(ValueError, match=r"sliding window \(5 tokens\) across padding inside a document"):
        ring.check_supported("flash_attention_2", spec, q, q, q)
    spec.window = None
    ring.check_supported("flash_attention_2", spec, q, q, q)  # without a window the segments skip the padding
    with pytest.raises(ValueError, match="flex_attention has no backward on CPU"):
        ring.check_supported("flex_attention", spec, q, q, q)
    with torch.no_grad():
        ring.check_supported("flex_attention", spec, q, q, q)


@pytest.mark.parametrize("layout_kind,causal,window", [("packed", True, None), ("padded-ends", True, 5)])
def test_ring_function_of_one_rank(reference_flash, layout_kind, causal, window):
    """The ring's autograd Function (ring.attend on a one-rank group, gloo) with the flash kernel
    (the reference of its varlen semantics) and flex (forward) = brute force."""
    q, k, v, do = _inputs()
    info = make_info(layout_kind, 2, 24)
    valid = torch.ones(2, 24, dtype=torch.bool) if info.key_valid is None else info.key_valid
    do = do * valid[:, None, :, None]
    want, want_grads = _reference(q, k, v, do, info, causal, window, 0.3)
    with one_rank_group("gloo") as group:
        got, grads = ring_of_one("flash_attention_2", q, k, v, info, causal, window, 0.3, do, group)
        with torch.no_grad():
            flex_out = ring.attend(
                "flex_attention", *(t.transpose(1, 2) for t in (q, k, v)), _spec(info, causal, window), group, 0, 1
            )
    _assert_close(got, grads, want, want_grads, rows=valid)
    torch.testing.assert_close(flex_out.transpose(1, 2), want, rtol=1e-5, atol=1e-5)
