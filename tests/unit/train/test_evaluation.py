"""The held-out split: by document content, independent of order, never empty on either side."""

from __future__ import annotations

import pytest
import torch

from ulysses_sp.data.text import Documents
from ulysses_sp.train.evaluation import is_heldout, split_heldout


def test_heldout_split_is_deterministic_by_content():
    docs = Documents(torch.arange(i, i + 5 + i % 7) for i in range(200))
    train, heldout = split_heldout(docs, 0.1)
    assert len(train) + len(heldout) == 200 and 5 <= len(heldout) <= 40
    reversed_docs = Documents(docs[i]["input_ids"] for i in reversed(range(200)))
    _, heldout_rev = split_heldout(reversed_docs, 0.1)
    key = lambda d: sorted(tuple(d[i]["input_ids"].tolist()) for i in range(len(d)))  # noqa: E731
    assert key(heldout) == key(heldout_rev)  # independent of document order
    assert all(is_heldout(heldout[i]["input_ids"], 0.1) for i in range(len(heldout)))
    with pytest.raises(ValueError, match=r"leaves 1 for training and 0 for evaluation; change --eval-fraction"):
        split_heldout(Documents([torch.tensor([1, 2, 3])]), 0.01)
