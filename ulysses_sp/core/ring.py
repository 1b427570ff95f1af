"""Ring attention over the ring group, run after the Ulysses all-to-all (hybrid SP).

Shape legend: B batch, r ring size, i this rank's ring rank, L = S'/r tokens of ring rank i (two
chunks of c = L/2 tokens: chunks i and 2r-1-i of the full sequence, layout.py), nq/nk query/kv
heads after the Ulysses exchange, H head dim (Hv for values). Blocks are [B, n, L, H] inside.

Forward: the K/V of every ring rank travels once around the ring (kv heads only: GQA sends nk, not
nq, heads); while block t is computed, block t+1 is already in flight (``comm.ring_shift``). Each
(query chunk, key chunk) pair runs the block kernel of the attention implementation (``KERNELS``:
backends/block.py, block_flex.py, block_flash.py) with the pair's mask from the one rule (masks.py,
global positions: causal, window, documents, padding) in that kernel's form, and the partial
outputs merge in fp32 by their log-sum-exp. Pairs that the rule rules out from positions alone
(causal: a later key chunk; window: every distance >= the window) are skipped, which with the
zigzag layout leaves every ring rank the same work; so are pairs whose mask (documents, padding)
allows nothing, outside torch.compile. Backward: the same ring; dK/dV accumulators
travel with their K/V block and reach their owner after a full turn. No rank ever holds more than
two K/V blocks: no full K/V is gathered.
"""

from __future__ import annotations

import torch

from . import comm
from .backends import block, block_flash, block_flex, flex
from .backends.spec import AttnSpec
from .comm import ProcessGroup
from .layout import ring_chunks
from .sequence_info import SequenceInfo

#: the block kernel of each attn_implementation that runs on the ring (the torch kernel for sdpa and
#: eager: torch's fused kernels return no lse that a backward can take back, see docs/scaling.md)
KERNELS = {"sdpa": block, "eager": block, "flex_attention": block_flex, "flash_attention_2": block_flash}
RING_BACKENDS = tuple(KERNELS)


def check_supported(impl: str, spec: AttnSpec, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """ValueError for what ring attention does not compute (yet); called before any collective, with
    this call's query [B, N, s, H], key [B, Nkv, s, H] and value [B, Nkv, s, Hv]."""
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if impl == "flex_attention" and query.device.type == "cpu" and training:
        raise ValueError(
            "flex_attention has no backward on CPU in torch, so the ring cannot train with it there; run the "
            "forward under torch.no_grad(), train on CUDA, or use attn_implementation='sdpa' or 'eager'"
        )
    if impl == "flex_attention":
        flex.check_head_dims(query, value)
    if impl == "flash_attention_2":
        block_flash.check(spec.info, _window(spec))
    refused = [
        (impl not in RING_BACKENDS, f"attn_implementation={impl!r} (it runs {list(RING_BACKENDS)})"),
        (spec.custom_mask is not None, "a custom attention mask (masks come from the step's SequenceInfo)"),
        (spec.sinks is not None, "attention sinks (s_aux, e.g. GPT-OSS)"),
        (spec.softcap is not None, "logit softcapping"),
        (spec.chunk is not None, "chunked attention (Llama 4)"),
        (spec.dropout > 0, f"attention dropout ({spec.dropout}); set attention_dropout=0"),
    ]
    for bad, what in refused:
        if bad:
            raise ValueError(
                f"ring attention (ring_size > 1) does not support {what}; train with ring_size=1 (Ulysses "
                "only) or remove it. The ring supports causal and bidirectional attention, packed "
                "documents, padding, sliding windows and GQA/MQA"
            )


def attend(impl: str, q, k, v, spec: AttnSpec, group: ProcessGroup, ring_rank: int, ring_size: int) -> torch.Tensor:
    """[B, L, nq, H], [B, L, nk, H], [B, L, nk, Hv] (this ring rank's two chunks) -> [B, L, nq, Hv],
    each pair through the block kernel of ``impl`` (``KERNELS``)."""
    window = _window(spec)
    kernel = KERNELS[impl]
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # [B, n, L, H]
    c = q.shape[1] // 2
    # the (query, key) chunk pairs of every step and their masks, made outside the autograd.Function
    # (cached in the step's info: a side effect dynamo cannot trace inside it)
    schedule = [
        _pairs(kernel, spec.info, spec.causal, window, ring_rank, (ring_rank - t) % ring_size, ring_size, c, q.device)
        for t in range(ring_size)
    ]
    args = (schedule, spec.scale, kernel, group, ring_size)
    return _RingAttention.apply(qt, kt, vt, *args).transpose(1, 2)  # [B, L, nq, Hv]


def _window(spec: AttnSpec) -> int | None:
    """The sliding window, None when there is none or it spans the whole sequence."""
    return spec.window if spec.window is not None and spec.window < spec.info.seq_len else None


def _pairs(kernel, info: SequenceInfo, causal: bool, window, q_rank: int, k_rank: int, r: int, c: int, device):
    """The (query half, key half, mask) pairs of ring ranks ``q_rank`` x ``k_rank`` that can attend:
    halves are 0/1 (the rank's first/second chunk); mask: the ``kernel``'s form of the pair's mask
    (``kernel.pair_mask``), or None (all allowed)."""
    out = []
    for qa, qc in enumerate(ring_chunks(q_rank, r)):
        for kb, kc in enumerate(ring_chunks(k_rank, r)):
            if causal and kc > qc:
                continue
            nearest = max(0, (abs(qc - kc) - 1) * c + 1)  # smallest |q - k| between the chunks
            farthest = (abs(qc - kc) + 1) * c - 1
            if window is not None and nearest >= window:
                continue
            limited = (causal and kc == qc) or (window is not None and farthest >= window)
            mask, empty = None, False
            if limited or not info.is_plain:
                key = ("ring", kernel.__name__, causal, window, qc, kc, c, str(device))
                if key not in info.cache:
                    qr, kr = range(qc * c, (qc + 1) * c), range(kc * c, (kc + 1) * c)
                    # a pair that documents or padding rule out entirely is skipped too: one host sync per
                    # pair and step (cached for every layer); not while compiling, where it would break the
                    # graph (the pair then runs, fully masked, and adds nothing)
                    info.cache[key] = kernel.pair_mask(info, causal, window, qr, kr, device)
                mask, empty = info.cache[key]
            if not empty:
                out.append((slice(qa * c, (qa + 1) * c), slice(kb * c, (kb + 1) * c), mask))
    return out


def _pack(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cat([a.reshape(-1), b.reshape(-1)])  # [a.numel() + b.numel()]


def _unpack(flat: torch.Tensor, a_shape, b_shape) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = flat.split([a_shape.numel(), b_shape.numel()])
    return a.view(a_shape), b.view(b_shape)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, schedule, scale, kernel, group, r):
        B, nq, L, _ = q.shape
        out = torch.zeros(B, nq, L, v.shape[-1], dtype=torch.float32, device=q.device)  # [B, nq, L, Hv]
        lse = torch.full((B, nq, L), float("-inf"), dtype=torch.float32, device=q.device)  # [B, nq, L]
        kv = _pack(k, v)
        for t in range(r):
            in_flight = comm.ring_shift(kv, group) if t < r - 1 else None  # the next block, during this one
            kt, vt = _unpack(kv, k.shape, v.shape)  # block of ring rank (rank - t) mod r
            for qs, ks, mask in schedule[t]:
                o, m = kernel.forward(q[:, :, qs], kt[:, :, ks], vt[:, :, ks], mask, scale)
                block.merge(out[:, :, qs], lse[:, :, qs], o, m)
            if in_flight is not None:
                kv = comm.wait(in_flight)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (schedule, scale, kernel, group, r)
        return out.to(q.dtype, copy=True)  # never the saved fp32 buffer itself (compile: no aliasing)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        schedule, scale, kernel, group, r = ctx.args
        do = grad.float()  # [B, nq, L, Hv]
        delta = (do * out).sum(-1)  # [B, nq, L]
        dq = torch.zeros_like(q, dtype=torch.float32)
        kv, dkv_in = _pack(k, v), None
        for t in range(r):
            in_flight = comm.ring_shift(kv, group) if t < r - 1 else None
            kt, vt = _unpack(kv, k.shape, v.shape)
            dk = torch.zeros_like(k, dtype=torch.float32)
            dv = torch.zeros_like(v, dtype=torch.float32)
            for qs, ks, mask in schedule[t]:
                pair = (q[:, :, qs], kt[:, :, ks], vt[:, :, ks], mask, scale)
                gq, gk, gv = kernel.backward(*pair, do[:, :, qs], out[:, :, qs], lse[:, :, qs], delta[:, :, qs])
                dq[:, :, qs] += gq
                dk[:, :, ks] += gk
                dv[:, :, ks] += gv
            dkv = _pack(dk, dv)  # this rank's share for the block; the earlier ranks' arrive now
            if dkv_in is not None:
                dkv = dkv + comm.wait(dkv_in)
            dkv_in = comm.ring_shift(dkv, group)  # on to the next rank; after r hops it is back home
            if in_flight is not None:
                kv = comm.wait(in_flight)
        dk, dv = _unpack(comm.wait(dkv_in), k.shape, v.shape)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *([None] * 5)
