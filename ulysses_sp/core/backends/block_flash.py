"""The ring's block kernel on flash-attn 2's varlen kernel: one (query block, key block) pair as
segments (one per document a query and key of the pair share), through flash-attn's
``_flash_attn_varlen_forward`` / ``_flash_attn_varlen_backward``, which return the log-sum-exp and
take the merged output and lse in the backward (the public functions do neither).

Shape legend: B batch, nq/nk query/key-value heads, L tokens of a block (query and key blocks have
the same length), H head dim (Hv for values, padded to H for flash), T tokens of one varlen call.
Blocks are [B, n, L, H]; out and lse come back in fp32 like block.py's (the reference).

A pair's :class:`VarlenCall` s come from the one mask rule (masks.py), specialised:
- the diagonal pair (query block = key block): every document's valid tokens, causal (or not)
  with the window as flash's ``window_size`` (equal segments: flash's alignment is the usual one);
- an off-diagonal pair: per row the document that has queries in one block and keys in the other
  (documents are contiguous, so at most one), full attention, or with a window the band
  ``|q - k| < window`` on global positions. flash aligns a segment's mask to its bottom-right
  corner, so for query positions [qa, qb) and keys [ka, kb) the band is ``window_size =
  (kb - qb + w - 1, qb - kb + w - 1)`` (right: -1 under causal masking, every key precedes every
  query); queries past the window's reach of the last key are cut off the segment first (and keys
  past the last query's reach), so both sizes are >= 0 (flash reads a negative size as no limit).
  Segments of different sizes go to separate calls. ``max_seqlen`` is passed as the larger of the
  query and key lengths: flash caps a window size at ``max_seqlen_k``, which must not cut a band.
Padding queries are left out (out 0, lse -inf; nothing reads them: the loss ignores padding and no
valid query reads a padding key), as flash's dense path does; a window across padding inside a
document is refused (``check``), as flash's dense path does. The plan of a pair is made on the host
once per step (cached in the step's SequenceInfo for every layer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..sequence_info import SequenceInfo


@lru_cache(maxsize=1)
def flash_ops():
    """(varlen forward, varlen backward) of flash-attn 2; ImportError when it is not installed."""
    from flash_attn.flash_attn_interface import _flash_attn_varlen_backward, _flash_attn_varlen_forward

    return _flash_attn_varlen_forward, _flash_attn_varlen_backward


def check(info: SequenceInfo, window) -> None:
    """ValueError for what this kernel cannot compute; called before the attention's first collective."""
    if window is not None and info.gapped:
        raise ValueError(
            f"flash-attention on the ring cannot apply the sliding window ({window} tokens) across padding inside "
            "a document: its varlen kernel drops padding, which shortens the distances the window is measured on. "
            "Put the padding at the ends of each sequence (or document), or use attn_implementation='sdpa' or "
            "'flex_attention'"
        )


@dataclass
class VarlenCall:
    """One varlen call of a pair: ``q_rows``/``k_rows`` [T] index the flattened [R*L] block (R rows of
    the info; ``plain``: R = 1, the plan of every row), segment lengths ``q_lens``/``k_lens``."""

    q_rows: torch.Tensor
    k_rows: torch.Tensor
    q_lens: list[int]
    k_lens: list[int]
    causal: bool
    left: int
    right: int
    plain: bool
    per_batch: dict = field(default_factory=dict, repr=False)

    def on(self, batch: int, L: int, device) -> tuple:
        """(q rows, k rows [T] int64, cu_seqlens_q, cu_seqlens_k [D+1] int32, max_seqlen) for ``batch`` rows."""
        key = (batch, str(device))
        if key not in self.per_batch:
            reps = batch if self.plain else 1
            shift = (torch.arange(reps) * L).view(-1, 1)  # [reps, 1]: a plain info's plan on every row
            rows = [(r.view(1, -1) + shift).reshape(-1).to(device) for r in (self.q_rows, self.k_rows)]
            cus = [
                F.pad(torch.tensor(n * reps).cumsum(0), (1, 0)).to(device, torch.int32)
                for n in (self.q_lens, self.k_lens)
            ]
            self.per_batch[key] = (*rows, *cus, max(self.q_lens + self.k_lens))
        return self.per_batch[key]


def _segments(doc_q, ok_q, doc_k, ok_k, q0: int, k0: int, causal: bool, window):
    """The (query rows, key rows, causal, left, right) segments of one row of a pair (module docstring);
    ``doc_*`` [L] document ids, ``ok_*`` [L] valid tokens, ``q0``/``k0`` the blocks' global starts."""
    qv, kv = ok_q.nonzero().flatten(), ok_k.nonzero().flatten()  # [Tq], [Tk] valid tokens
    w = -1 if window is None else window - 1
    if q0 == k0:
        _, counts = torch.unique_consecutive(doc_q[qv], return_counts=True)
        return [(s, s, causal, w, 0 if causal else w) for s in qv.split(counts.tolist())]
    assert not causal or k0 < q0, "under causal masking the ring skips a key chunk after the query chunk"
    docs = torch.unique(doc_q[qv])
    out = []
    for d in docs[torch.isin(docs, doc_k[kv])].tolist():  # the documents with queries and keys in the pair
        qs, ks = qv[doc_q[qv] == d], kv[doc_k[kv] == d]
        if window is None:
            out.append((qs, ks, False, -1, -1))
            continue
        qb, kb = q0 + int(qs[-1]) + 1, k0 + int(ks[-1]) + 1  # ends of the (contiguous) segments
        qs = qs[qs + q0 < kb + w]  # queries within reach of the last key
        ks = ks[ks + k0 < qb + w]  # keys within reach of the last query
        if not len(qs) or not len(ks):
            continue
        qb, kb = q0 + int(qs[-1]) + 1, k0 + int(ks[-1]) + 1
        out.append((qs, ks, False, kb - qb + w, -1 if causal else qb - kb + w))
    return out


def pair_mask(info: SequenceInfo, causal: bool, window, q_pos: range, k_pos: range, device):
    """(the pair's list of VarlenCall, whether it is empty) for queries at global positions ``q_pos``
    and keys at ``k_pos``; one host transfer of the pair's documents and padding."""
    L = len(q_pos)
    rows = info.rows or 1
    doc = torch.zeros(rows, info.seq_len, dtype=torch.int32) if info.doc_ids is None else info.doc_ids.cpu()
    ok = torch.ones(rows, info.seq_len, dtype=torch.bool) if info.key_valid is None else info.key_valid.cpu()
    groups: dict[tuple, tuple[list, list, list, list]] = {}
    for r in range(rows):
        dq, oq = doc[r, q_pos.start : q_pos.stop], ok[r, q_pos.start : q_pos.stop]
        dk, ok_k = doc[r, k_pos.start : k_pos.stop], ok[r, k_pos.start : k_pos.stop]
        for qs, ks, *kind in _segments(dq, oq, dk, ok_k, q_pos.start, k_pos.start, causal, window):
            g = groups.setdefault(tuple(kind), ([], [], [], []))
            g[0].append(qs + r * L)
            g[1].append(ks + r * L)
            g[2].append(len(qs))
            g[3].append(len(ks))
    calls = [
        VarlenCall(torch.cat(g[0]), torch.cat(g[1]), g[2], g[3], *kind, info.is_plain) for kind, g in groups.items()
    ]
    return calls, not calls


@lru_cache(maxsize=8)
def _full_pair(L: int) -> list[VarlenCall]:
    """The plan of a pair whose every (query, key) is allowed, on every row."""
    return [VarlenCall(torch.arange(L), torch.arange(L), [L], [L], False, -1, -1, True)]


def _flat(x: torch.Tensor, dtype, width: int) -> torch.Tensor:
    """[B, n, L, X] -> [B*L, n, width] in ``dtype``, zero-padded: flash takes head dims that are a
    multiple of 8 and values as wide as queries (MLA's are narrower); zeros change no score."""
    x = x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[-1]).to(dtype)
    return F.pad(x, [0, width - x.shape[-1]])


def _precision(q: torch.Tensor) -> tuple[torch.dtype, int]:
    """(flash's dtype: half precision, fp32 blocks run in bf16 as on flash's dense path; padded head dim)."""
    return (q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16), -(-q.shape[-1] // 8) * 8


def forward(q, k, v, plan, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """As block.forward; ``plan`` a pair's VarlenCall list from :func:`pair_mask` or None (every pair
    allowed). Half precision inside (fp32 blocks run in bf16, like flash's dense path)."""
    fwd, _ = flash_ops()
    B, nq, L, _ = q.shape
    Hv = v.shape[-1]
    half, Hp = _precision(q)
    qf, kf, vf = (_flat(t, half, Hp) for t in (q, k, v))  # [B*L, n, Hp]
    out = torch.zeros(B * L, nq, Hv, dtype=torch.float32, device=q.device)  # [B*L, nq, Hv]
    lse = torch.full((nq, B * L), float("-inf"), dtype=torch.float32, device=q.device)  # [nq, B*L]
    for call in plan if plan is not None else _full_pair(L):
        qr, kr, cu_q, cu_k, m = call.on(B, L, q.device)
        o, l_ = fwd(qf[qr], kf[kr], vf[kr], cu_q, cu_k, m, m, 0.0, scale, call.causal, call.left, call.right)[:2]
        out[qr] = o[..., :Hv].float()  # [T, nq, Hv]
        lse[:, qr] = torch.where(l_ == float("inf"), float("-inf"), l_)  # flash: +inf for a row with no key
    out = out.view(B, L, nq, Hv).transpose(1, 2)  # [B, nq, L, Hv]
    return out, lse.view(nq, B, L).transpose(0, 1)  # [B, nq, L]


def backward(q, k, v, plan, scale: float, do, out, lse, delta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As block.backward, from the merged ``out`` and ``lse`` (flash computes rowsum(do * out) itself;
    ``delta`` is unused). Returns fp32 dq [B, nq, L, H], dk [B, nk, L, H], dv [B, nk, L, Hv]."""
    _, bwd = flash_ops()
    B, nq, L, H = q.shape
    nk, Hv = k.shape[1], v.shape[-1]
    half, Hp = _precision(q)
    qf, kf, vf = (_flat(t, half, Hp) for t in (q, k, v))  # [B*L, n, Hp]
    dof, outf = _flat(do, half, Hp), _flat(out, half, Hp)  # [B*L, nq, Hp]; zero columns add 0 to rowsum(do * out)
    lsef = lse.transpose(0, 1).reshape(nq, B * L)  # [nq, B*L]
    dq = torch.zeros(B * L, nq, Hp, dtype=torch.float32, device=q.device)
    dk = torch.zeros(B * L, nk, Hp, dtype=torch.float32, device=q.device)
    dv = torch.zeros(B * L, nk, Hp, dtype=torch.float32, device=q.device)
    for call in plan if plan is not None else _full_pair(L):
        qr, kr, cu_q, cu_k, m = call.on(B, L, q.device)
        qc, kc, vc = qf[qr], kf[kr], vf[kr]  # [T, n, H]
        gq, gk, gv = torch.empty_like(qc), torch.empty_like(kc), torch.empty_like(vc)
        bwd(
            dof[qr], qc, kc, vc, outf[qr], lsef[:, qr].contiguous(), gq, gk, gv, cu_q, cu_k, m, m, 0.0, scale,
            call.causal, call.left, call.right, 0.0, None, False,
        )  # fmt: skip
        dq.index_add_(0, qr, gq.float())
        dk.index_add_(0, kr, gk.float())
        dv.index_add_(0, kr, gv.float())
    unflat = lambda t, n, X: t[..., :X].reshape(B, L, n, X).transpose(1, 2)  # noqa: E731  [B*L, n, *] -> [B, n, L, X]
    return unflat(dq, nq, H), unflat(dk, nk, H), unflat(dv, nk, Hv)
