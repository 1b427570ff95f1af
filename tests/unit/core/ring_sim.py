"""One process playing every ring rank: the ring's schedule (``ring._pairs``) and merge with one
block kernel, blocks exchanged by indexing instead of P2P; brute-force attention; the test inputs.
Shared by the block-kernel tests (test_ring.py, test_ring_kernels.py, test_ring_kernels_cuda.py).

Shape legend: B batch, n heads (nq query, nk key/value), S sequence, H head dim; [B, n, S, H]."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from ulysses_sp.core import layout, masks, ring
from ulysses_sp.core.backends.spec import AttnSpec
from ulysses_sp.core.sequence_info import SequenceInfo, build_sequence_info

#: (layout kind of make_info, causal, sliding window, ring size) of the block-kernel tests; S = 24
CASES = [
    ("plain", True, None, 2),
    ("plain", True, None, 4),
    ("packed", True, None, 2),
    ("padded", True, None, 3),
    ("plain", True, 3, 2),  # window shorter than a chunk (c = 6)
    ("packed", True, 9, 2),  # longer than a chunk
    ("padded-ends", True, 8, 2),  # padding at the ends of the rows only
    ("plain", False, None, 2),
    ("padded", False, 5, 2),  # a window across padding inside a row (flash refuses it)
    ("packed", False, 5, 2),
]


def brute(q, k, v, info, causal, window, scale):
    """Attention over the full sequence with the dense rule: [B, nq, S, Hv]."""
    g = q.shape[1] // k.shape[1]
    s = q.float() @ k.float().repeat_interleave(g, 1).transpose(2, 3) * scale  # [B, nq, S, S]
    s = s.masked_fill(~masks.dense_mask(info, causal, window, q.device), float("-inf"))
    return torch.softmax(s, -1) @ v.float().repeat_interleave(g, 1)


def make_info(kind: str, B: int, S: int, device="cpu") -> SequenceInfo:
    """plain; packed (row 0: documents of 7, 11 and S - 18 tokens); padded (left padding in row 0,
    interior padding in the last row); padded-ends (left padding in row 0, right padding in the last)."""
    if kind == "plain":
        return SequenceInfo(S)
    if kind == "packed":
        pos = torch.tensor([list(range(7)) + list(range(11)) + list(range(S - 18)), list(range(S))])
        return build_sequence_info(pos[:B]).to(torch.device(device))
    mask = torch.ones(B, S, dtype=torch.int64)
    mask[0, :4] = 0
    mask[-1, 10:13] = 0
    if kind == "padded-ends":
        mask[-1] = 1
        mask[-1, S - 5 :] = 0
    return build_sequence_info(torch.arange(S).expand(B, S), mask).to(torch.device(device))


def simulated_ring(kernel, q, k, v, info, causal, window, scale, r, do=None):
    """Every ring rank's forward and (with ``do`` [B, nq, S, Hv]) backward through ``kernel``
    -> (out [B, nq, S, Hv] fp32, (dq, dk, dv) fp32 or None)."""
    S = q.shape[2]
    c = S // (2 * r)
    order = layout.layout_order(S, r)
    own = [order[i * 2 * c : (i + 1) * 2 * c] for i in range(r)]  # ring rank i's positions
    pairs = lambda i, j: ring._pairs(kernel, info, causal, window, i, j, r, c, q.device)  # noqa: E731
    outs, lses = [], []
    for i in range(r):
        out = torch.zeros(*q.shape[:2], 2 * c, v.shape[-1], device=q.device)
        lse = torch.full((*q.shape[:2], 2 * c), float("-inf"), device=q.device)
        for j in range(r):
            kj, vj = k[:, :, own[j]], v[:, :, own[j]]
            for qs, ks, mask in pairs(i, j):
                o, m = kernel.forward(q[:, :, own[i]][:, :, qs], kj[:, :, ks], vj[:, :, ks], mask, scale)
                ring.block.merge(out[:, :, qs], lse[:, :, qs], o, m)
        outs.append(out)
        lses.append(lse)
    full = torch.zeros(*q.shape[:3], v.shape[-1], device=q.device)
    for i in range(r):
        full[:, :, own[i]] = outs[i]
    if do is None:
        return full, None
    dq, dk, dv = (torch.zeros(t.shape, device=q.device) for t in (q, k, v))
    for i in range(r):
        qi, doi = q[:, :, own[i]], do[:, :, own[i]].float()
        delta = (doi * outs[i]).sum(-1)
        for j in range(r):
            kj, vj = k[:, :, own[j]], v[:, :, own[j]]
            for qs, ks, mask in pairs(i, j):
                pair = (qi[:, :, qs], kj[:, :, ks], vj[:, :, ks], mask, scale)
                merged = (doi[:, :, qs], outs[i][:, :, qs], lses[i][:, :, qs], delta[:, :, qs])
                gq, gk, gv = kernel.backward(*pair, *merged)
                dq[:, :, own[i][qs]] += gq
                dk[:, :, own[j][ks]] += gk
                dv[:, :, own[j][ks]] += gv
    return full, (dq, dk, dv)


@contextlib.contextmanager
def one_rank_group(backend: str):
    """A process group of this process alone (a ring of one rank: the ring's autograd Function and
    its functional P2P run whole, every block local)."""
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def ring_of_one(impl, q, k, v, info, causal, window, scale, do, group):
    """``ring.attend`` at ring size 1 (two chunks, three pairs under causal masking) on [B, n, S, H]
    blocks, forward and backward -> (out [B, nq, S, Hv], (dq, dk, dv))."""
    qkv = [t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v)]  # [B, S, n, H]
    spec = AttnSpec(causal=causal, scale=scale, dropout=0.0, window=window, softcap=None, info=info, custom_mask=None)
    out = ring.attend(impl, *qkv, spec, group, 0, 1)  # [B, S, nq, Hv]
    out.backward(do.transpose(1, 2).to(out.dtype))
    return out.detach().transpose(1, 2).float(), tuple(t.grad.transpose(1, 2).float() for t in qkv)
