"""The ring's CUDA block kernel (memory-efficient attention with lse) against the pure-torch block
kernel: two key blocks per query block, merged by their lse, then each pair's backward from the
merged output and lse (as the ring runs them). Masks: none, causal diagonal, packed documents with
padding (rows that read nothing in one block), a window; GQA; block lengths off the kernel's
16/32 alignments. GPU only (run by /work/gpu-requests/ring.sh)."""

from __future__ import annotations

import pytest
import torch

from ulysses_sp.core import masks
from ulysses_sp.core.backends import block, block_cuda
from ulysses_sp.core.sequence_info import SequenceInfo, build_sequence_info

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch's efficient attention)")


def _info(kind: str, S: int) -> SequenceInfo:
    if kind == "plain":
        return SequenceInfo(S)
    pos = torch.cat([torch.arange(S // 3), torch.arange(S - S // 3)]).expand(2, S)
    mask = torch.ones(2, S, dtype=torch.int64)
    mask[1, S // 2 : S // 2 + 5] = 0
    return build_sequence_info(pos, mask if kind == "padded" else None).to(torch.device("cuda"))


def _run(kernel, q, ks, vs, mask_list, scale, do):
    out = torch.zeros(*q.shape[:3], vs[0].shape[-1], device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), device=q.device)
    for k, v, m in zip(ks, vs, mask_list):
        block.merge(out, lse, *kernel.forward(q, k, v, m, scale))
    delta = (do * out).sum(-1)
    grads = [kernel.backward(q, k, v, m, scale, do, out, lse, delta) for k, v, m in zip(ks, vs, mask_list)]
    return out, lse, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind,window", [("plain", None), ("packed", None), ("padded", None), ("plain", 7)])
@pytest.mark.parametrize("c", [24, 64])
def test_cuda_block_kernel_matches_torch_kernel(dtype, kind, window, c):
    g = torch.Generator(device="cuda").manual_seed(0)
    B, nq, nk, H = 2, 4, 2, 64
    S = 2 * c
    info = _info(kind, S)
    q = torch.randn(B, nq, c, H, device="cuda", generator=g).to(dtype)  # queries: the second chunk
    ks = [torch.randn(B, nk, c, H, device="cuda", generator=g).to(dtype) for _ in range(2)]
    vs = [torch.randn(B, nk, c, H, device="cuda", generator=g).to(dtype) for _ in range(2)]
    qr, kr = range(c, 2 * c), [range(0, c), range(c, 2 * c)]
    mask_list = [masks.block_mask(info, True, window, qr, r, "cuda") for r in kr]
    if kind == "plain" and window is None:
        mask_list[0] = None  # a full pair: no bias
    do = torch.randn(B, nq, c, H, device="cuda", generator=g)
    want = _run(block, q, ks, vs, mask_list, 0.125, do)
    got = _run(block_cuda, q, ks, vs, mask_list, 0.125, do)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[0], want[0], **tol)
    torch.testing.assert_close(got[1], want[1], **tol)
    for pair_got, pair_want in zip(got[2], want[2]):
        for a, b, name in zip(pair_got, pair_want, ("dq", "dk", "dv")):
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}: {m}")
