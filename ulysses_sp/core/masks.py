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
    q = torch.arange(S, device=device).view(S, 1)  # [S, 1]
    k = torch.arange(S, device=device).view(1, S)  # [1, S]
    ok = (k <= q) if causal else torch.ones(S, S, dtype=torch.bool, device=device)
    if window is not None:
        ok = ok & ((q - k) < window) if causal else ok & ((q - k).abs() < window)
    ok = ok.view(1, 1, S, S)  # [1, 1, S, S]
    if info.doc_ids is not None:
        doc = info.doc_ids.to(device)
        ok = ok & (doc[:, None, :, None] == doc[:, None, None, :])  # [B, 1, S, S]
    if info.key_valid is not None:
        valid = info.key_valid.to(device)[:, None, None, :]  # [B, 1, 1, S]
        ok = ok & (valid | torch.eye(S, dtype=torch.bool, device=device))
    return ok
