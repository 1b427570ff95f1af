"""The ring's flex and flash block kernels on CUDA against the torch block kernel on the same
inputs: every ring rank simulated on one GPU (ring_sim.py), outputs and q/k/v gradients of the
merged attention, for causal and bidirectional attention, packed documents, padding, windows
shorter and longer than a chunk, GQA; chunks of 64 and (flash) 40 tokens (off the kernels' tile
sizes); the ring's autograd Function whole on a one-rank NCCL group. flex: eager (torch's
reference implementation, fp32 and bf16: no compilation) and compiled (its CUDA path, bf16; the
first cases compile for minutes); flash: flash-attn 2's varlen kernels, bf16 (fp32 blocks run in
bf16 on flash). GPU only (/work/gpu-requests/ring-kernels.sh)."""

from __future__ import annotations

import pytest
import torch

from ulysses_sp.core import ring
from ulysses_sp.core.backends import block, block_flash, block_flex, flex
from ulysses_sp.core.backends.spec import AttnSpec
from ulysses_sp.core.sequence_info import SequenceInfo

from .ring_sim import make_info, one_rank_group, ring_of_one, simulated_ring

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CASES = [
    ("plain", True, None, 2),
    ("packed", True, None, 2),
    ("padded", True, None, 2),
    ("plain", True, 17, 2),  # a window shorter than a chunk
    ("padded-ends", True, 90, 2),  # longer than a chunk
    ("packed", False, 30, 2),
    ("plain", True, None, 3),
]


def _run(kernel, dtype, layout_kind, causal, window, r, c):
    g = torch.Generator(device="cuda").manual_seed(0)
    B, nq, nk, H, S = 2, 4, 2, 64, 2 * r * c
    q, k, v = (torch.randn(B, n, S, H, device="cuda", generator=g).to(dtype) for n in (nq, nk, nk))
    do = torch.randn(B, nq, S, H, device="cuda", generator=g)
    info = make_info(layout_kind, B, S, "cuda")
    valid = torch.ones(B, S, dtype=torch.bool, device="cuda") if info.key_valid is None else info.key_valid
    do = do * valid[:, None, :, None]  # padding queries: no gradient reaches them (flash computes none)
    got = simulated_ring(kernel, q, k, v, info, causal, window, 0.125, r, do)
    want = simulated_ring(block, q, k, v, info, causal, window, 0.125, r, do)
    tol = dict(rtol=3e-2, atol=3e-2) if dtype == torch.bfloat16 or kernel is block_flash else dict(rtol=1e-3, atol=1e-3)
    rows = lambda t: t.transpose(1, 2)[valid]  # noqa: E731  [B, n, S, H] -> [T, n, H]
    torch.testing.assert_close(rows(got[0]), rows(want[0]), **tol, msg=lambda m: f"out: {m}")
    assert torch.isfinite(got[0]).all()
    for name, a, b in zip("qkv", got[1], want[1]):
        assert torch.isfinite(a).all(), f"d{name} not finite"
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("c", [64, 40])
@pytest.mark.parametrize("layout_kind,causal,window,r", CASES)
def test_flash_block_kernel_matches_torch_kernel(layout_kind, causal, window, r, c):
    pytest.importorskip("flash_attn")
    _run(block_flash, torch.bfloat16, layout_kind, causal, window, r, c)


@pytest.fixture
def eager_flex(monkeypatch):
    """flex's reference implementation on CUDA (no compilation: torch runs it with autograd, its
    lse gradient included) in place of the compiled kernels the ring uses there."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    monkeypatch.setattr(flex, "flex_function", lambda device: flex_attention)
    monkeypatch.setattr(flex, "_compiled_create_block_mask", lambda: create_block_mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout_kind,causal,window,r", CASES[:4] + CASES[5:6])
def test_flex_eager_block_kernel_matches_torch_kernel(eager_flex, layout_kind, causal, window, r, dtype):
    _run(block_flex, dtype, layout_kind, causal, window, r, 64)


@pytest.mark.parametrize("layout_kind,causal,window,r", [CASES[0], CASES[1], CASES[3]])
def test_flex_compiled_block_kernel_matches_torch_kernel(layout_kind, causal, window, r):
    """bf16, three cases: each mask kind (none, a BlockMask of a plain or per-row rule, each window)
    with and without gradients is one compilation of flex, ~10-30 s each."""
    _run(block_flex, torch.bfloat16, layout_kind, causal, window, r, 64)


def test_flex_refuses_head_dims_below_16():
    q = torch.zeros(1, 2, 4, 8, device="cuda")
    spec = AttnSpec(
        causal=True, scale=0.3, dropout=0.0, window=None, softcap=None, info=SequenceInfo(8), custom_mask=None
    )
    with pytest.raises(ValueError, match="needs head dims >= 16; this model's are 8"):
        ring.check_supported("flex_attention", spec, q, q, q)


@pytest.mark.parametrize(
    "impl,layout_kind,window",
    [
        ("flash_attention_2", "packed", None),
        ("flash_attention_2", "padded-ends", 30),
        ("flex_attention", "packed", None),  # the compiled block test's masks: no new compilation
    ],
)
def test_ring_function_of_one_rank(impl, layout_kind, window):
    """The ring's autograd Function whole (ring.attend on a one-rank NCCL group: the functional P2P,
    the merge, the backward's dK/dV turn) with the flash / flex kernel = with the torch kernel, bf16."""
    if impl == "flash_attention_2":
        pytest.importorskip("flash_attn")
    g = torch.Generator(device="cuda").manual_seed(1)
    B, nq, nk, H, S = 2, 4, 2, 64, 128  # chunks of 64, as in the block tests (no new flex compilation)
    q, k, v = (torch.randn(B, n, S, H, device="cuda", generator=g).to(torch.bfloat16) for n in (nq, nk, nk))
    do = torch.randn(B, nq, S, H, device="cuda", generator=g)
    info = make_info(layout_kind, B, S, "cuda")
    valid = torch.ones(B, S, dtype=torch.bool, device="cuda") if info.key_valid is None else info.key_valid
    do = do * valid[:, None, :, None]
    torch.cuda.set_device(0)
    with one_rank_group("nccl") as group:
        got = ring_of_one(impl, q, k, v, info, True, window, 0.125, do, group)
        want = ring_of_one("sdpa", q, k, v, info, True, window, 0.125, do, group)
    tol = dict(rtol=3e-2, atol=3e-2)
    rows = lambda t: t.transpose(1, 2)[valid]  # noqa: E731
    torch.testing.assert_close(rows(got[0]), rows(want[0]), **tol, msg=lambda m: f"{impl} out: {m}")
    for name, a, b in zip("qkv", got[1], want[1]):
        assert torch.isfinite(a).all(), f"{impl} d{name} not finite"
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{impl} d{name}: {m}")
