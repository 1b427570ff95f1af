"""Attention masks for the full sequence after the all-to-all, built from a SequenceInfo.

Shape legend: B batch, S full sequence. One rule for every backend: query q may read key k when
    k <= q (causal)  and  q - k < window (sliding window)  and  doc[q] == doc[k] (packing)
    and  pos[q] // chunk == pos[k] // chunk (chunked attention, Llama 4: pos counts from the
    start of the document)  and  (valid[k] or k == q)  (padding keys are never read; a padding
    query reads itself, so no row is empty and no NaN appears)
Flex gets it as a mask_mod (block-sparse, never dense); eager and the sdpa fallback get a dense
bool mask, built only when a memory-safe route does not exist.
"""

from __future__ import annotations

import torch

from .sequence_info import SequenceInfo


def positions_in_documents(info: SequenceInfo, device) -> torch.Tensor:
    """[B, S] position of every token from the start of its document (a plain info: [1, S] indices)."""
    idx = torch.arange(info.seq_len, device=device)  # [S]
    if info.doc_ids is None:
        return idx.view(1, -1)
    doc = info.doc_ids.to(device)
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    return idx - torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # [B, S]


def mask_mod(info: SequenceInfo, causal: bool, window: int | None, chunk: int | None = None):
    """The rule above as a flex ``mask_mod(b, h, q, k) -> bool``."""
    doc, valid = info.doc_ids, info.key_valid
    pos = None if chunk is None or doc is None else positions_in_documents(info, doc.device)  # [B, S]

    def rule(b, h, q, k):
        ok = k <= q if causal else q >= 0
        if window is not None:
            ok = ok & (q - k < window) if causal else ok & ((q - k).abs() < window)
        if doc is not None:
            ok = ok & (doc[b, q] == doc[b, k])
        if chunk is not None:
            ok = ok & ((q // chunk == k // chunk) if pos is None else (pos[b, q] // chunk == pos[b, k] // chunk))
        if valid is not None:
            ok = ok & (valid[b, k] | (q == k))
        return ok

    return rule


def dense_mask(info: SequenceInfo, causal: bool, window: int | None, device, chunk: int | None = None) -> torch.Tensor:
    """The rule above as a dense bool mask [B or 1, 1, S, S] (True = attend). O(S^2) memory."""
    S = info.seq_len
    return block_mask(info, causal, window, range(S), range(S), device, chunk)


def block_mask(
    info: SequenceInfo, causal: bool, window: int | None, q_pos: range, k_pos: range, device, chunk: int | None = None
) -> torch.Tensor:
    """The rule above for queries at global positions ``q_pos`` and keys at ``k_pos`` (ranges of the
    full sequence, e.g. one chunk pair of ring attention) as a bool mask [B or 1, 1, Sq, Sk]."""
    Sq, Sk = len(q_pos), len(k_pos)
    q = torch.arange(q_pos.start, q_pos.stop, device=device).view(Sq, 1)  # [Sq, 1]
    k = torch.arange(k_pos.start, k_pos.stop, device=device).view(1, Sk)  # [1, Sk]
    ok = (k <= q) if causal else torch.ones(Sq, Sk, dtype=torch.bool, device=device)
    if window is not None:
        ok = ok & ((q - k) < window) if causal else ok & ((q - k).abs() < window)
    ok = ok.view(1, 1, Sq, Sk)  # [1, 1, Sq, Sk]
    if info.doc_ids is not None:
        doc = info.doc_ids.to(device)
        ok = ok & (doc[:, None, q_pos.start : q_pos.stop, None] == doc[:, None, None, k_pos.start : k_pos.stop])
    if chunk is not None:
        ids = positions_in_documents(info, device) // chunk  # [B|1, S]
        ok = ok & (ids[:, None, q_pos.start : q_pos.stop, None] == ids[:, None, None, k_pos.start : k_pos.stop])
    if info.key_valid is not None:
        valid = info.key_valid.to(device)[:, None, None, k_pos.start : k_pos.stop]  # [B, 1, 1, Sk]
        ok = ok & (valid | (q == k))  # [B, 1, Sq, Sk]
    return ok
