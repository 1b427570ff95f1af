"""Collating samples of different lengths into one full batch (before it is sharded).

Shape legend: B samples, S the longest of them, n one sample's length.
"""

from __future__ import annotations

import torch
from torch.utils.data import default_collate

from ..core.vlm import IMAGE_KEYS


def collate_padded(
    samples: list[dict], pad_token_id: int = 0, ignore_index: int = -100, pad_to_multiple_of: int = 1
) -> dict:
    """Right-pad B samples to the longest, S (rounded up to ``pad_to_multiple_of``, e.g. sp_size for a
    VLM, which is called with the full batch): -> ``input_ids`` [B, S], ``labels`` [B, S], ...

    ``labels`` default to the input ids; padding gets ``pad_token_id`` in input_ids,
    ``ignore_index`` in labels, continued ``position_ids`` and 0 in any other per-token field (a
    value as long as the sample's input_ids). No attention mask is made: under causal attention no
    real token reads a later padding token, and padding is never a target, so the batch keeps the
    fastest (plain causal) kernel path. A VLM's ``pixel_values`` [patches, C*T*p*p] and
    ``image_grid_thw`` [images, 3] (videos' likewise) are concatenated along dim 0 in sample order, as
    its processor does for a batch; samples without them add no rows.
    Other fields go through torch's ``default_collate``.
    """
    if not samples:
        raise ValueError("collate_padded got an empty batch")
    ids = [torch.as_tensor(x["input_ids"], dtype=torch.long).reshape(-1) for x in samples]
    lengths = [t.numel() for t in ids]
    S = max(lengths)
    if S == 0:
        raise ValueError("every sample of the batch is empty")
    S = -(-S // pad_to_multiple_of) * pad_to_multiple_of
    batch = {}
    for key in IMAGE_KEYS:  # samples without images (or videos) add no rows
        if any(x.get(key) is not None for x in samples):
            batch[key] = torch.cat([torch.as_tensor(x[key]) for x in samples if x.get(key) is not None])
    for key in samples[0]:
        if key in IMAGE_KEYS:
            continue
        values = ids if key == "input_ids" else [_per_token(x[key], n) for x, n in zip(samples, lengths)]
        if any(v is None for v in values):
            batch[key] = default_collate([x[key] for x in samples])
            continue
        fill = {"input_ids": pad_token_id, "labels": ignore_index}.get(key, 0)
        batch[key] = torch.stack([_pad_row(v, S, fill, continue_=key == "position_ids") for v in values])
    if "labels" not in batch:
        batch["labels"] = torch.stack([_pad_row(t, S, ignore_index) for t in ids])  # [B, S]
    return batch


def _per_token(value, n: int) -> torch.Tensor | None:
    """``value`` as a tensor when it has one entry per token (first dim ``n``), else None."""
    if isinstance(value, (str, bytes)):
        return None
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        return None
    return t if t.dim() >= 1 and t.shape[0] == n else None


def _pad_row(t: torch.Tensor, length: int, fill, continue_: bool = False) -> torch.Tensor:
    """[n, ...] -> [length, ...], appending ``fill`` (or, with ``continue_``, last + 1, + 2, ...)."""
    n = t.shape[0]
    if n == length:
        return t
    if continue_:
        last = t[-1] if n else torch.tensor(-1, dtype=t.dtype)
        return torch.cat([t, last + torch.arange(1, length - n + 1, dtype=t.dtype)])
    return torch.cat([t, t.new_full((length - n, *t.shape[1:]), fill)])
