"""Position ids and the document layout of the full sequence, built once per step.

Shape legend: B batch, S full (padded) sequence, s = S/P local tokens, T valid tokens over B*S.

Each rank holds tokens [sp_rank*s, (sp_rank+1)*s) (with a ring: its tokens of the load-balanced
layout, layout.py) with their *global* position ids. Attention runs
over all S tokens after the all-to-all, so it needs the full picture: where documents start
(position ids that do not continue, or ``cu_seqlens`` given by the data path) and which keys are
padding. :class:`SequenceInfo` carries that, computed once per step and passed to every attention
call as the keyword ``SEQ_INFO_KWARG`` (transformers forwards unknown kwargs from the model call down
to the attention function, and gradient checkpointing replays them unchanged).
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field

import torch

#: keyword under which the step's SequenceInfo travels from the model call to attention.
SEQ_INFO_KWARG = "ulysses_sp_info"


class StepCache(MutableMapping):
    """What the attention calls of one step derive from its layout once (masks, kernel plans), shared by
    every layer. Deliberately not a dict: wrappers that rebuild the containers of a module's inputs
    (FSDP2 casting them to bf16 rebuilds dicts and dataclasses at every decoder layer) would otherwise
    hand each layer an empty copy, and every layer would derive them again, host syncs included."""

    def __init__(self):
        self._entries: dict = {}

    def __getitem__(self, key):
        return self._entries[key]

    def __setitem__(self, key, value) -> None:
        self._entries[key] = value

    def __delitem__(self, key) -> None:
        del self._entries[key]

    def __iter__(self) -> Iterator:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class SequenceInfo:
    """Document layout of one step's full sequence; ``None`` fields mean "plain causal, no padding".

    doc_ids:     [B, S] int32, a query attends only keys with the same id (packed documents).
    key_valid:   [B, S] bool, False marks padding keys (from a 2-D attention mask).
    cu_seqlens:  [D+1] int32, cumulative document lengths over the T valid tokens of the flattened
                 batch, for varlen kernels (flash-attn, torch varlen); ``max_seqlen`` their maximum.
    valid_index: [T] int64 positions of the valid tokens in the flattened B*S (None: all valid).
    gapped:      a document has padding between its valid tokens (interior padding). Varlen kernels
                 drop padding, which shortens the distances across the gap: they cannot apply a
                 sliding window (defined on positions in the sequence, as transformers' masks) there.
    """

    seq_len: int
    doc_ids: torch.Tensor | None = None
    key_valid: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None
    valid_index: torch.Tensor | None = None
    gapped: bool = False
    cache: StepCache = field(default_factory=StepCache, repr=False, compare=False)

    @property
    def is_plain(self) -> bool:
        return self.doc_ids is None and self.key_valid is None

    @property
    def rows(self) -> int | None:
        """B, the rows the layout describes; None for a plain info (every row alike)."""
        return None if self.is_plain else (self.doc_ids if self.doc_ids is not None else self.key_valid).shape[0]

    def to(self, device: torch.device) -> SequenceInfo:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return SequenceInfo(
            self.seq_len,
            move(self.doc_ids),
            move(self.key_valid),
            move(self.cu_seqlens),
            self.max_seqlen,
            move(self.valid_index),
            self.gapped,
        )


def check_non_negative(position_ids: torch.Tensor) -> None:
    """ValueError when a position id is negative (one host sync)."""
    lowest = int(position_ids.min()) if position_ids.numel() else 0
    if lowest < 0:
        raise ValueError(
            f"position_ids hold negative values (min {lowest}); positions count from 0 at the start of "
            "each sequence (or packed document)"
        )


def document_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] -> [B, S] bool, True where a document starts (position not previous + 1)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


def doc_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """Document ids [B, S] from cumulative lengths over the flattened batch (rows never share one)."""
    flat = torch.zeros(batch * seq_len, dtype=torch.int32, device=cu_seqlens.device)
    flat[cu_seqlens[1:-1].long()] = 1
    flat[torch.arange(0, batch * seq_len, seq_len, device=cu_seqlens.device)] = 1
    return (flat.view(batch, seq_len).cumsum(1) - 1).to(torch.int32)  # [B, S], ids restart per row


def build_sequence_info(
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    *,
    batch: int | None = None,
    seq_len: int | None = None,
    detect_plain: bool = True,
) -> SequenceInfo:
    """Layout of the full sequence from its position ids [B, S] (3-D mRoPE ids: the first row),
    an optional 2-D padding mask [B, S] (1 = token, 0 = padding) and/or ``cu_seqlens`` over B*S.

    With ``detect_plain`` (one host sync per step) a batch with a single document per row and no
    padding gives a plain info, so attention keeps its fastest causal path.
    """
    if position_ids is not None and position_ids.dim() == 3:
        position_ids = position_ids[0]  # [3, B, S] mRoPE: temporal row carries document resets
    ref = position_ids if position_ids is not None else attention_mask
    if ref is not None:
        batch, seq_len = ref.shape
    if batch is None or seq_len is None:
        raise ValueError("build_sequence_info needs position_ids, attention_mask or (batch, seq_len)")
    if cu_seqlens is not None:
        doc_ids = doc_ids_from_cu_seqlens(cu_seqlens, batch, seq_len)
        starts = torch.zeros(batch, seq_len, dtype=torch.bool, device=cu_seqlens.device)
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        starts[:, 0] = True
    elif position_ids is not None:
        starts = document_starts(position_ids)
    else:
        starts = None
    key_valid = None if attention_mask is None else attention_mask.to(torch.bool)
    if detect_plain:
        packed = starts is not None and bool(starts[:, 1:].any())
        padded = key_valid is not None and not bool(key_valid.all())
        starts = starts if packed else None
        key_valid = key_valid if padded else None
    if starts is None and key_valid is None:
        return SequenceInfo(seq_len)
    device = (starts if starts is not None else key_valid).device
    if starts is None:
        starts = torch.zeros(batch, seq_len, dtype=torch.bool, device=device)
        starts[:, 0] = True
    doc_ids = (starts.to(torch.int32).cumsum(1) - 1).to(torch.int32)
    # varlen layout: documents over the flattened valid tokens; padding tokens are dropped
    flat_starts = starts.reshape(-1)
    valid_index, gapped = None, False
    if key_valid is not None:
        valid_index = key_valid.reshape(-1).nonzero().squeeze(1)  # [T]
        # a document whose first tokens are padding starts at its first valid token
        doc_flat = (flat_starts.to(torch.int32).cumsum(0))[valid_index]  # [T]
        flat_starts = torch.ones_like(doc_flat, dtype=torch.bool)
        flat_starts[1:] = doc_flat[1:] != doc_flat[:-1]
        # consecutive valid tokens of one document that are not neighbours in the sequence
        gapped = bool(((valid_index[1:] - valid_index[:-1] != 1) & ~flat_starts[1:]).any())
    start_idx = flat_starts.nonzero().squeeze(1)
    total = flat_starts.numel()
    cu = torch.cat([start_idx, torch.tensor([total], device=device)]).to(torch.int32)
    max_seqlen = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    return SequenceInfo(seq_len, doc_ids, key_valid, cu, max_seqlen, valid_index, gapped)
