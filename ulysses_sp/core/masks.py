"""Attention masks for the full sequence after the all-to-all, built from a SequenceInfo.

Shape legend: B batch, S full sequence. One rule for every backend: query q may read key k when
    k <= q (causal)  and  q - k < window (sliding window)  and  doc[q] == doc[k] (packing)
    and  (valid[k] or k == q)  (padding keys are never read; a padding query reads itself, so no
    row is empty and no NaN appears)
Flex gets it as a mask_mod (block-sparse, never dense); eager and the sdpa fallback get a dense
bool mask, built only when a memory-safe route does not exist.
"""

from __future__ import annotations

import torch

from .sequence_info import SequenceInfo


def mask_mod(info: SequenceInfo, causal: bool, window: int | None):
    """The rule above as a flex ``mask_mod(b, h, q, k) -> bool``."""
    doc, valid = info.doc_ids, info.key_valid

    def rule(b, h, q, k):
        ok = k <= q if causal else q >= 0
        if window is not None:
            ok = ok & (q - k < window) if causal else ok & ((q - k).abs() < window)
        if doc is not None:
            ok = ok & (doc[b, q] == doc[b, k])
        if valid is not None:
            ok = ok & (valid[b, k] | (q == k))
        return ok

    return rule


def dense_mask(info: SequenceInfo, causal: bool, window: int | None, device) -> torch.Tensor:
    """The rule above as a dense bool mask [B or 1, 1, S, S] (True = attend). O(S^2) memory."""
    S = info.seq_len
    return block_mask(info, causal, window, range(S), range(S), device)


def block_mask(
    info: SequenceInfo, causal: bool, window: int | None, q_pos: range, k_pos: range, device
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
    if info.key_valid is not None:
        valid = info.key_valid.to(device)[:, None, None, k_pos.start : k_pos.stop]  # [B, 1, 1, Sk]
        ok = ok & (valid | (q == k))  # [B, 1, Sq, Sk]
    return ok
