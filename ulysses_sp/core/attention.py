"""UlyssesAttention: the all-to-all wrapper around one model's core attention.

Shape legend: B batch, S full sequence, s = S/P local tokens, P = sp_size, U = P / ring_size ranks
of the Ulysses group, Nq/Nkv heads of the model, nq/nk heads this rank computes, H head dim (Hv for
values).

transformers calls ``fn(module, query, key, value, attention_mask, **kwargs)`` with q/k/v laid out
[B, N, s, H] (RoPE already applied with global positions) and expects ``([B, s, Nq, Hv], weights)``.
We re-shard to [B, S, n, H], run the backend over the whole sequence, and re-shard back. With a ring
(hybrid SP) the all-to-all runs over the Ulysses group, giving [B, s*U, n, H] (this ring rank's
tokens), and ring attention (ring.py) runs over the ring group instead of the backend.
Per-head inputs follow the heads: a per-head mask and attention sinks (``s_aux`` [Nq], GPT-OSS) are
sliced to this rank's query heads; their gradients then sum over the SP group like any other.

Head chunks (``head_chunks`` C > 1, as in "Untied Ulysses"/UPipe): the model's heads are cut into C
groups of whole kv heads with their query heads (Nq/C, Nkv/C), and the all-to-all, the kernel and
the inverse all-to-all run per group under a non-reentrant checkpoint. The full-sequence tensors
of one group exist at a time, in the forward and in the backward (which recomputes the group's
all-to-alls and kernel forward), so the attention's working set is 1/C of all heads' [B, S, n, H];
each head's math is unchanged, so the gradients are exact. Cost: one more kernel forward and
all-to-all round per layer and step (what selective checkpointing would have saved). The chunks'
gradients are written into one buffer per input (:class:`_HeadChunk`): a plain slice's backward
would make a zero-padded full-size gradient per chunk, and autograd would hold and sum C of them,
more than the chunking saves (measured: 3 of them live at the peak of a 128K step).
"""

from __future__ import annotations

import warnings

import torch
from torch.utils.checkpoint import checkpoint

from . import backends, ring
from .all_to_all import heads_to_seq, seq_to_heads
from .heads import plan_heads
from .layout import ring_size_of
from .sequence_info import SEQ_INFO_KWARG, SequenceInfo
from .topology import SPTopology, ulysses_of


class UlyssesAttention:
    """Callable registered with transformers' AttentionInterface for one model.

    ``backend`` is the core kernel ("sdpa", "flash_attention_2", "flash_attention_3",
    "flex_attention" or "eager"); it always sees the full sequence, never a shard.
    """

    def __init__(self, topology: SPTopology, backend: str, head_chunks: int = 1):
        if backend not in backends.SUPPORTED:
            raise ValueError(
                f"attention implementation {backend!r} is not supported by ulysses_sp; "
                f"use one of {list(backends.SUPPORTED)}"
            )
        if backend == "eager":  # warned here, not per call: a warning inside forward breaks compiled graphs
            warnings.warn(
                "ulysses_sp: eager attention materialises [B, N/P, S, S] scores on every rank; prefer "
                "sdpa, flex_attention or flash_attention_2 for long sequences",
                stacklevel=3,
            )
        self.topology = topology
        self.backend = backend
        self.head_chunks = head_chunks

    def __call__(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        sliding_window: int | None = None,
        softcap: float | None = None,
        is_causal: bool | None = None,
        s_aux: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        P = self.topology.sp_size
        B, Nq, s, H = query.shape
        info: SequenceInfo = kwargs.get(SEQ_INFO_KWARG) or SequenceInfo(s * P)
        if info.seq_len != s * P:
            raise ValueError(
                f"attention got {s} local tokens on each of {P} SP ranks ({s * P} in all) but the step's "
                f"sequence info describes {info.seq_len} tokens; pass the output of ulysses_sp.shard_batch"
            )
        # Llama 4's NoPE layers scale queries by their index; the shard is contiguous (no ring: apply refuses it)
        query = _temperature_at_global_positions(module, query, self.topology.sp_rank * s)
        spec = dict(
            causal=is_causal if is_causal is not None else getattr(module, "is_causal", True),
            scale=scaling if scaling is not None else H**-0.5,
            dropout=dropout,
            window=sliding_window,
            chunk=chunk_size(module),
            softcap=softcap,
            info=info,
        )
        C = self.head_chunks
        if C == 1:
            out = self._attend(query, key, value, attention_mask, s_aux, spec)
        else:  # C groups of whole kv heads with their query heads (module docstring)
            nq, nkv = Nq // C, key.shape[1] // C
            # one gradient buffer each for q, k, v; under torch.compile plain slices (dynamo cannot trace a
            # backward that mutates state outside the graph; it would run the whole layer eagerly)
            compiling = torch.compiler.is_compiling()
            grads = [None] * 3 if compiling else [_ChunkGrads(t, C) for t in (query, key, value)]
            outs = []
            for c in range(C):
                q_c, kv_c = slice(c * nq, (c + 1) * nq), slice(c * nkv, (c + 1) * nkv)
                mask = attention_mask
                if torch.is_tensor(mask) and mask.dim() == 4 and mask.shape[1] == Nq:
                    mask = mask[:, q_c]  # a per-head mask follows its heads
                sinks = None if s_aux is None else s_aux[q_c]
                chunk = [
                    t[:, heads] if compiling else _HeadChunk.apply(t, heads, g)
                    for t, heads, g in zip((query, key, value), (q_c, kv_c, kv_c), grads)
                ]  # [B, nq|nkv, s, H]
                outs.append(checkpoint(self._attend, *chunk, mask, sinks, spec, use_reentrant=False))
            out = torch.cat(outs, dim=2)  # [B, s, Nq, Hv]
        # contiguous, as transformers' own kernels return it: models .view() it (JetMoE, AFMoE), and with
        # one head per rank the reshape in heads_to_seq (or a kernel's transpose at P = 1) is a strided view
        return out.contiguous(), None

    def _attend(self, query, key, value, attention_mask, s_aux, spec: dict) -> torch.Tensor:
        """[B, Nq, s, H] q / [B, Nkv, s, H] k, v of this call (or of one head chunk) -> [B, s, Nq, Hv]."""
        topo = self.topology
        P, ring_size = topo.sp_size, ring_size_of(topo)
        U, rank, group = ulysses_of(topo)  # the all-to-all's group: the SP group without a ring
        B, Nq, s, H = query.shape
        # integer arithmetic, planned per call: a cache filled on the first call would be a guard that
        # the second call fails, one more compilation of the layer under torch.compile
        plan = plan_heads(Nq, key.shape[1], U)
        spec = backends.AttnSpec(
            **spec,
            custom_mask=self._full_mask(attention_mask, s * P, s, Nq, plan.q_slice(rank)),
            sinks=None if s_aux is None else s_aux[plan.q_slice(rank)],  # [nq]
        )
        if ring_size > 1:
            ring.check_supported(self.backend, spec, query, key, value)  # before the first collective of this call
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, s, N, H]
        if U > 1:
            q, k, v = seq_to_heads(
                [q, k, v], [plan.q_heads, plan.kv_heads, plan.kv_heads], group, rank
            )  # [B, s*U, n, H]: all of this ring rank's tokens (all S without a ring)
        if ring_size > 1:
            out = ring.attend(
                self.backend, q, k, v, spec, topo.ring_group, topo.ring_rank, topo.ring_size
            )  # [B, s*U, nq, Hv]
        else:
            out = backends.run(self.backend, q, k, v, spec)  # [B, S, nq, Hv]
        if U > 1:
            out = heads_to_seq(out, plan.q_heads, group, rank)  # [B, s, Nq, Hv]
        return out

    @staticmethod
    def _full_mask(mask, S: int, s: int, Nq: int, my_heads: slice):
        """A user's custom mask must describe the full sequence: [B|1, 1|Nq, S, S] (a tensor or a flex
        BlockMask); a per-head tensor is sliced to this rank's heads -> [B|1, nq, S, S]."""
        if mask is None:
            return None
        shape = tuple(mask.shape)
        if len(shape) == 4 and shape[-2:] == (s, s) and s < S:
            raise ValueError(
                f"attention got a [{s}, {s}] mask, the size of the local shard ({S} tokens over {S // s} ranks): "
                "a mask the model builds from its own inputs (e.g. a dynamic or chunked mask) covers only the "
                "shard under sequence parallelism, and ulysses_sp cannot use it; this model cannot run with SP "
                "(a mask of your own must cover the full sequence)"
            )
        if len(shape) != 4 or shape[-2:] != (S, S) or shape[1] not in (1, Nq):
            raise ValueError(
                f"under sequence parallelism a custom attention mask must cover the full sequence: "
                f"[B, {S}, {S}] or [B, 1 or {Nq}, {S}, {S}], got {list(shape)}. A 2-D padding mask should "
                "be passed as attention_mask of the local shard ([B, S/P]) so ulysses_sp can gather it."
            )
        if shape[1] == Nq and my_heads != slice(0, Nq):
            if not isinstance(mask, torch.Tensor):
                raise ValueError(
                    f"a per-head BlockMask ({Nq} heads) cannot be split across SP ranks (slicing drops its "
                    "mask_mod); build it with H=None so that one mask serves every head"
                )
            mask = mask[:, my_heads]  # [B, nq, S, S]
        return mask


class _ChunkGrads:
    """The gradient of one input [B, N, s, H] of head-chunked attention, assembled chunk by chunk:
    the first chunk's backward allocates it, each writes its heads, the last returns it (and resets).
    Keeps the input's shape and layout, not the input: a tensor held outside save_for_backward would
    escape the layer's checkpoint and stay alive until the backward."""

    def __init__(self, x: torch.Tensor, chunks: int):
        self.like = torch.empty_like(x, device="meta")  # x's layout where it is dense, else contiguous
        self.device, self.chunks, self.left, self.full = x.device, chunks, chunks, None

    def add(self, heads: slice, grad: torch.Tensor) -> torch.Tensor | None:
        if self.full is None:
            self.full = torch.empty_like(self.like, device=self.device)
        self.full[:, heads].copy_(grad)  # autograd materialises a chunk's missing gradient as zeros
        self.left -= 1
        if self.left:
            return None  # autograd adds nothing for None: the buffer is returned once, whole
        full, self.full, self.left = self.full, None, self.chunks
        return full


class _HeadChunk(torch.autograd.Function):
    """``x[:, heads]`` of a head-chunked input [B, N, s, H] -> [B, n, s, H], whose backward writes
    into the input's :class:`_ChunkGrads` instead of returning a zero-padded full-size gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, heads: slice, grads: _ChunkGrads) -> torch.Tensor:
        ctx.heads, ctx.grads = heads, grads
        return x[:, heads]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.grads.add(ctx.heads, grad), None, None


def chunk_size(module: torch.nn.Module) -> int | None:
    """The chunk length of a chunked-attention layer (Llama 4: ``layer_types[i] == "chunked_attention"``),
    else None. transformers expresses chunks only through the mask it builds, which we do not use.

    ``layer_idx`` is read only for a model that has chunked layers: under torch.compile reading it
    guards the layer's graph on its index, and every further layer would recompile (past dynamo's
    recompile limit the remaining layers run eager)."""
    config = getattr(module, "config", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None or "chunked_attention" not in layer_types:
        return None
    layer = getattr(module, "layer_idx", None)
    if layer is None or layer_types[layer] != "chunked_attention":
        return None
    return config.attention_chunk_size


def _temperature_at_global_positions(module: torch.nn.Module, query: torch.Tensor, offset: int) -> torch.Tensor:
    """Llama 4's NoPE layers scale queries by a function of each token's index in the call
    (``attn_temperature_tuning``), computed from ``arange`` of the shard; rescale [B, N, s, H] queries
    to the indices ``offset + i`` they have in the full sequence, as the non-SP model computes them."""
    if offset == 0 or not getattr(module, "attn_temperature_tuning", False) or getattr(module, "use_rope", True):
        return query
    local = torch.arange(query.shape[2], device=query.device, dtype=torch.float32)  # [s]

    def scale(index):
        return torch.log1p(torch.floor((index + 1.0) / module.floor_scale)) * module.attn_scale + 1.0

    return (query * (scale(local + offset) / scale(local)).view(1, 1, -1, 1)).to(query.dtype)
