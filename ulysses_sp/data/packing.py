"""Packing variable-length documents into rows, position ids restarting at every document.

Shape legend: L = seq_len (row length), T tokens of all documents, D documents, n <= L tokens of
one row, B documents of one batch.

:class:`PackedDataset` concatenates the documents of a map-style dataset, in dataset order, into one
stream of T tokens and cuts it into rows of exactly L tokens (only the last row may be shorter): no
padding, and row ``i`` is a pure function of ``i`` and the dataset, so shuffling rows and resuming by
row index stay exact. Short documents share a row; a document that crosses a row edge (any document
longer than L does) is split there, and its continuation starts the next row with position ids
restarting at 0: every piece is a document of its own, attended to alone, exactly as if the
continuation were a separate text. (Rows never attend to each other, so continuing the positions
would give the continuation no context anyway.)

``position_ids`` carry the layout: :func:`ulysses_sp.shard_batch` reads a restart as a
document start, keeps attention inside documents and labels no token with the next document's first.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from ..core.checks import check_int


class PackedDataset(Dataset):
    """Rows of ``seq_len`` tokens packed from ``dataset`` (items with ``input_ids``, optional ``labels``).

    Item ``i`` is ``{"input_ids": [n], "position_ids": [n]}`` (plus ``labels`` [n] when the documents
    have them), n = seq_len except possibly for the last row. Document lengths are read once here.
    """

    def __init__(self, dataset, seq_len: int):
        check_int("seq_len", seq_len)
        lengths = getattr(dataset, "lengths", None)
        if lengths is None:
            lengths = torch.tensor([len(dataset[i]["input_ids"]) for i in range(len(dataset))], dtype=torch.long)
        self.dataset = dataset
        self.seq_len = seq_len
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.long().cumsum(0)])  # [D+1]
        self.total = int(self.offsets[-1])
        if self.total == 0:
            raise ValueError(f"cannot pack an empty dataset ({len(dataset)} documents, 0 tokens)")
        self.has_labels = "labels" in dataset[0]

    def __len__(self) -> int:
        return -(-self.total // self.seq_len)

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} packed rows")
        lo, hi = index * self.seq_len, min((index + 1) * self.seq_len, self.total)
        doc = int(torch.searchsorted(self.offsets, lo, right=True)) - 1  # document holding token lo
        keys = ("input_ids", "labels") if self.has_labels else ("input_ids",)
        pieces = {k: [] for k in keys}
        positions = []
        while doc < len(self.offsets) - 1 and int(self.offsets[doc]) < hi:
            start = int(self.offsets[doc])
            a, b = max(lo, start) - start, min(hi, int(self.offsets[doc + 1])) - start
            if b > a:
                item = self.dataset[doc]
                for k in keys:
                    pieces[k].append(torch.as_tensor(item[k], dtype=torch.long)[a:b])
                positions.append(torch.arange(b - a))
            doc += 1
        row = {k: torch.cat(v) for k, v in pieces.items()}  # [n] each
        row["position_ids"] = torch.cat(positions)  # [n], restarting at 0 per piece
        return row


def pack_collate(samples: list[dict]) -> dict:
    """Flatten a batch of B documents into one row (transformers' ``DataCollatorWithFlattening``).

    Returns ``input_ids``, ``labels`` (the documents' own, else their input_ids) and ``position_ids``
    restarting at each document, all [1, T] with T the batch's total tokens.
    """
    if not samples:
        raise ValueError("pack_collate got an empty batch")
    ids = [torch.as_tensor(x["input_ids"], dtype=torch.long) for x in samples]
    labels = [torch.as_tensor(x["labels"], dtype=torch.long) if "labels" in x else t for x, t in zip(samples, ids)]
    return {
        "input_ids": torch.cat(ids).unsqueeze(0),  # [1, T]
        "labels": torch.cat(labels).unsqueeze(0),  # [1, T]
        "position_ids": torch.cat([torch.arange(len(t)) for t in ids]).unsqueeze(0),  # [1, T]
    }
