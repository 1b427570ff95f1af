"""Text corpora as token documents: the bundled corpus, .txt, .jsonl and ``datasets`` directories.

Shape legend: T tokens of all documents, D documents, L = seq_len, n <= L tokens of one row.

Tokens are UTF-8 bytes (vocab 256), so the tiny presets (``vocab_size=256``) train on any text with
no tokenizer download. A ``.jsonl`` file or a ``datasets`` directory may carry ``input_ids`` of its
own tokenizer instead; then the model's vocabulary must cover them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable

import numpy as np
import torch
from torch.utils.data import Dataset

from ..core.checks import check_int
from .packing import PackedDataset

BYTE_VOCAB_SIZE = 256
#: the corpus bundled with the package (original prose, documents separated by blank lines).
CORPUS_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "corpus.txt")


def encode_bytes(text: str) -> torch.Tensor:
    """Text -> [n] int64 UTF-8 byte values (0..255)."""
    return torch.from_numpy(np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64))


class Documents(Dataset):
    """Token documents stored flat: ``tokens`` [T] int64 and ``offsets`` [D+1]; empty documents are dropped.

    Item ``i`` is ``{"input_ids": [n_i]}``; ``lengths`` [D] lets :class:`PackedDataset` skip a pass.
    """

    def __init__(self, docs: Iterable):
        parts = [t for t in (torch.as_tensor(d, dtype=torch.long).reshape(-1) for d in docs) if t.numel() > 0]
        self.tokens = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)  # [T]
        lengths = torch.tensor([t.numel() for t in parts], dtype=torch.long)  # [D]
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])  # [D+1]

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets.diff()  # [D]

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def __getitem__(self, index: int) -> dict:
        lo, hi = int(self.offsets[index]), int(self.offsets[index + 1])
        return {"input_ids": self.tokens[lo:hi]}  # [n_i] view

    def chunked(self, seq_len: int) -> Documents:
        """The same tokens with every document split into pieces of at most ``seq_len``."""
        return Documents(piece for i in range(len(self)) for piece in self[i]["input_ids"].split(seq_len))


def read_documents(path: str | None = None, *, text_key: str = "text") -> Documents:
    """Documents of ``path``: None (the bundled corpus), a ``.txt`` file (documents separated by blank
    lines), a ``.jsonl`` file (``input_ids`` or ``text_key`` per line) or a ``datasets.save_to_disk``
    directory (a DatasetDict's ``train`` split)."""
    path = CORPUS_PATH if path is None else os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset path {path!r} does not exist")
    if os.path.isdir(path):
        docs = _from_disk(path, text_key)
    elif path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            docs = [encode_bytes(d.strip()) for d in re.split(r"\n[ \t\r]*\n", f.read())]
    elif path.endswith(".jsonl"):
        docs = _from_jsonl(path, text_key)
    else:
        raise ValueError(
            f"unknown dataset format for {path!r}: expected a .txt file, a .jsonl file or a "
            "directory written by datasets.Dataset.save_to_disk"
        )
    documents = Documents(docs)
    if len(documents) == 0:
        raise ValueError(f"dataset {path!r} holds no tokens (no non-empty documents)")
    return documents


def load_text_dataset(path: str | None, seq_len: int, pack: bool, *, text_key: str = "text") -> Dataset:
    """A map-style dataset of rows ``{"input_ids": [n]}`` with n <= ``seq_len`` from ``path`` (see
    :func:`read_documents`; None = the bundled corpus).

    ``pack=True``: a :class:`PackedDataset`, rows of exactly ``seq_len`` tokens (the last may be
    shorter) holding several documents, with ``position_ids`` [n] restarting at each. ``pack=False``:
    one row per document, a document longer than ``seq_len`` split into consecutive rows.
    """
    check_int("seq_len", seq_len)
    documents = read_documents(path, text_key=text_key)
    return PackedDataset(documents, seq_len) if pack else documents.chunked(seq_len)


def _row_tokens(row: dict, text_key: str, where: str) -> torch.Tensor:
    if row.get("input_ids") is not None:
        return torch.as_tensor(row["input_ids"], dtype=torch.long)
    if isinstance(row.get(text_key), str):
        return encode_bytes(row[text_key])
    raise ValueError(f"{where}: expected an 'input_ids' list or a {text_key!r} string, found keys {sorted(row)}")


def _from_jsonl(path: str, text_key: str) -> list[torch.Tensor]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            docs.append(_row_tokens(row, text_key, f"{path}:{number}"))
    return docs


def _from_disk(path: str, text_key: str) -> list[torch.Tensor]:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError as e:
        raise ValueError(f"{path!r} is a directory but not one written by datasets save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"{path!r} holds the splits {sorted(ds)}; expected a 'train' split or a single Dataset")
        ds = ds["train"]
    column = "input_ids" if "input_ids" in ds.column_names else text_key
    if column not in ds.column_names:
        raise ValueError(f"{path!r}: expected an 'input_ids' or {text_key!r} column, found {ds.column_names}")
    return [_row_tokens({column: value}, text_key, f"{path} row {i}") for i, value in enumerate(ds[column])]
