"""Packing variable-length documents into rows, position ids restarting at every document.

Shape legend: L = seq_len (row length), T tokens of all documents, D documents, n <= L tokens of
one row, B documents of one batch, R rows.

:class:`PackedDataset` concatenates the documents of a map-style dataset, in dataset order, into one
stream of T tokens and cuts it into rows of exactly L tokens (only the last row may be shorter): no
padding, and row ``i`` is a pure function of ``i`` and the dataset, so shuffling rows and resuming by
row index stay exact. Short documents share a row; a document that crosses a row edge (any document
longer than L does) is split there, and its continuation starts the next row with position ids
restarting at 0: every piece is a document of its own, attended to alone, exactly as if the
continuation were a separate text. (Rows never attend to each other, so continuing the positions
would give the continuation no context anyway.)

A vision-language model's documents carry images (``pixel_values``, ``image_grid_thw``..., core/vlm.py)
whose tokens must stay with them: ``whole_documents=True`` fills each row with whole documents, in
dataset order, until the next one does not fit (rows of at most L tokens, the collator pads them);
a row's images are its documents' images concatenated in document order. Splitting a document that
carries images is refused (at setup when this class reads the documents' lengths, else when the row
is read).

``position_ids`` carry the layout: :func:`ulysses_sp.shard_batch` reads a restart as a
document start, keeps attention inside documents and labels no token with the next document's first
(for a VLM, ``shard_batch(..., vlm=True)`` and the model compute each document's mRoPE positions).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from ..core.checks import check_int
from ..core.vlm import IMAGE_KEYS

#: per-token fields besides input_ids / labels that packing concatenates (text tokens: 0)
_PER_TOKEN = ("mm_token_type_ids",)


class PackedDataset(Dataset):
    """Rows of ``seq_len`` tokens packed from ``dataset`` (items with ``input_ids``, optional ``labels``,
    a VLM's ``mm_token_type_ids`` and images).

    Item ``i`` is ``{"input_ids": [n], "position_ids": [n]}`` (plus ``labels`` [n] when the documents
    have them, and a VLM's fields), n = seq_len except possibly for the last row (any row with
    ``whole_documents``). Document lengths are read once here.
    """

    def __init__(self, dataset, seq_len: int, *, whole_documents: bool = False):
        check_int("seq_len", seq_len)
        lengths, imaged = getattr(dataset, "lengths", None), []
        if lengths is None:  # one pass over the documents: their lengths, and which carry images
            items = [dataset[i] for i in range(len(dataset))]
            lengths = torch.tensor([len(x["input_ids"]) for x in items], dtype=torch.long)
            imaged = [any(x.get(k) is not None for k in IMAGE_KEYS) for x in items]
        self.dataset = dataset
        self.seq_len = seq_len
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.long().cumsum(0)])  # [D+1]
        self.total = int(self.offsets[-1])
        if self.total == 0:
            raise ValueError(f"cannot pack an empty dataset ({len(dataset)} documents, 0 tokens)")
        first = dataset[0]
        self.has_labels = "labels" in first
        self.per_token = [k for k in _PER_TOKEN if k in first]
        self.row_docs = _whole_document_rows(lengths.tolist(), seq_len) if whole_documents else None  # [R+1]
        if not whole_documents:  # at setup what __getitem__ would refuse mid-training (when the pass ran)
            for doc in (d for d, has in enumerate(imaged) if has):
                self._check_not_split(doc)

    def __len__(self) -> int:
        if self.row_docs is not None:
            return len(self.row_docs) - 1
        return -(-self.total // self.seq_len)

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} packed rows")
        if self.row_docs is not None:
            docs = range(self.row_docs[index], self.row_docs[index + 1])
            lo, hi = int(self.offsets[docs[0]]), int(self.offsets[docs[-1] + 1])
        else:
            lo, hi = index * self.seq_len, min((index + 1) * self.seq_len, self.total)
            doc = int(torch.searchsorted(self.offsets, lo, right=True)) - 1  # document holding token lo
            last = int(torch.searchsorted(self.offsets, hi, right=False))  # one past the last document
            docs = range(doc, last)
        keys = ["input_ids", *(["labels"] if self.has_labels else []), *self.per_token]
        pieces = {k: [] for k in [*keys, "position_ids"]}
        images = {}
        for doc in docs:
            start, end = int(self.offsets[doc]), int(self.offsets[doc + 1])
            a, b = max(lo, start) - start, min(hi, end) - start
            if b <= a:
                continue
            item = self.dataset[doc]
            for k in keys:
                value = item.get(k)
                if value is None:  # a document without labels learns its tokens; a text document's types are 0
                    value = item["input_ids"] if k == "labels" else torch.zeros(end - start)
                pieces[k].append(torch.as_tensor(value).long()[a:b])
            pieces["position_ids"].append(torch.arange(b - a))
            carried = [k for k in IMAGE_KEYS if item.get(k) is not None]
            if carried:
                self._check_not_split(doc)
            for k in carried:
                images.setdefault(k, []).append(torch.as_tensor(item[k]))
        row = {k: torch.cat(v) for k, v in pieces.items()}  # [n] each; positions restart at 0 per piece
        row.update({k: torch.cat(v) for k, v in images.items()})  # [rows of the documents' images, ...]
        return row

    def _check_not_split(self, doc: int) -> None:
        """ValueError when document ``doc`` (which carries images) crosses a row edge."""
        start, end = int(self.offsets[doc]), int(self.offsets[doc + 1])
        if self.row_docs is None and end > start and start // self.seq_len != (end - 1) // self.seq_len:
            raise ValueError(
                f"document {doc} carries images but crosses a row edge (tokens {start}..{end - 1} of the stream, rows "
                f"of {self.seq_len} tokens): its images would be cut off from their tokens; pack a vision-language "
                "model's documents with PackedDataset(dataset, seq_len, whole_documents=True)"
            )


def _whole_document_rows(lengths: list[int], seq_len: int) -> list[int]:
    """First document of each row, then D: documents in order, a new row when the next does not fit."""
    starts, used = [0], 0
    for doc, n in enumerate(lengths):
        if n > seq_len:
            raise ValueError(
                f"document {doc} has {n} tokens, more than seq_len={seq_len}; whole_documents packing never "
                "splits a document: raise seq_len or shorten the document"
            )
        if used + n > seq_len:
            starts.append(doc)
            used = 0
        used += n
    return [*starts, len(lengths)]


def pack_collate(samples: list[dict]) -> dict:
    """Flatten a batch of B documents into one row (transformers' ``DataCollatorWithFlattening``).

    Returns ``input_ids``, ``labels`` (the documents' own, else their input_ids) and ``position_ids``
    restarting at each document, all [1, T] with T the batch's total tokens; a VLM's
    ``mm_token_type_ids`` [1, T] and images (``pixel_values``, ``image_grid_thw``...) concatenated in
    document order.
    """
    if not samples:
        raise ValueError("pack_collate got an empty batch")
    ids = [torch.as_tensor(x["input_ids"], dtype=torch.long) for x in samples]
    labels = [torch.as_tensor(x["labels"], dtype=torch.long) if "labels" in x else t for x, t in zip(samples, ids)]
    out = {
        "input_ids": torch.cat(ids).unsqueeze(0),  # [1, T]
        "labels": torch.cat(labels).unsqueeze(0),  # [1, T]
        "position_ids": torch.cat([torch.arange(len(t)) for t in ids]).unsqueeze(0),  # [1, T]
    }
    for key in _PER_TOKEN:
        if any(key in x for x in samples):
            values = [torch.as_tensor(x[key]).long() if key in x else torch.zeros_like(t) for x, t in zip(samples, ids)]
            out[key] = torch.cat(values).unsqueeze(0)  # [1, T]
    for key in IMAGE_KEYS:
        if any(x.get(key) is not None for x in samples):
            out[key] = torch.cat([torch.as_tensor(x[key]) for x in samples if x.get(key) is not None])  # [rows, ...]
    return out
