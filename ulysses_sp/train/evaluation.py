"""Held-out evaluation under sequence parallelism: the split, and the loss / perplexity loop.

The split is by document and by content: a document is held out when the CRC32 of its tokens
falls below ``fraction`` of the hash range. It depends on nothing but the data (not the seed, the
world size, sp, dp or the order of the documents), a duplicated document lands on one side only
(no train/eval leakage), and the held-out share is ``fraction`` on average.

Evaluation runs like training, on the local shards (every rank keeps S/P tokens; the full sequence
exists only inside attention, as in training: long sequences cost what they cost in training,
minus the activations kept for the backward), with the model in ``eval()`` mode (no dropout) and
under ``torch.no_grad()``. It draws no random numbers, so a run with evaluation trains exactly like
one without. The loss is the token mean over every held-out token read, across all SP and DP
ranks: the same number a single process computes on the same batches.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from ..core import comm
from ..core.sharding import to_device
from ..data.text import Documents
from ..loss.tiled_ce import IGNORE_INDEX

_HASH_RANGE = 1 << 32


def is_heldout(tokens: torch.Tensor, fraction: float) -> bool:
    """Whether a document (its token ids) belongs to the held-out split."""
    data = np.ascontiguousarray(tokens.to(torch.int64).numpy())
    return zlib.crc32(data.tobytes()) < fraction * _HASH_RANGE


def split_heldout(documents: Documents, fraction: float) -> tuple[Documents, Documents]:
    """(train, held-out) documents; ValueError when either side is empty."""
    if not 0 < fraction < 1:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction}")
    docs = [documents[i]["input_ids"] for i in range(len(documents))]
    flags = [is_heldout(d, fraction) for d in docs]
    train = Documents(d for d, held in zip(docs, flags) if not held)
    heldout = Documents(d for d, held in zip(docs, flags) if held)
    if len(heldout) == 0 or len(train) == 0:
        raise ValueError(
            f"holding out {fraction:.0%} of {len(docs)} documents leaves {len(train)} for training and "
            f"{len(heldout)} for evaluation; change --eval-fraction or use a larger dataset"
        )
    return train, heldout


@dataclass(frozen=True)
class EvalResult:
    loss: float  # token-mean cross-entropy over the held-out tokens read
    tokens: int  # labelled tokens evaluated, all ranks
    batches: int  # batches per DP replica
    seconds: float

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    def record(self, step: int) -> dict:
        return {
            "step": step,
            "eval_loss": self.loss,
            "eval_ppl": self.perplexity,
            "eval_tokens": self.tokens,
            "eval_batches": self.batches,
            "eval_time_s": self.seconds,
        }


def evaluate(
    engine, batches: Iterable[dict], topology, *, device: torch.device, autocast, max_batches: int | None = None
) -> EvalResult:
    """Token-mean loss of ``engine``'s model over ``batches`` (local shards, the same count on every rank).

    ``engine`` provides ``set_train(mode)`` and ``loss_sum(local_batch)`` (the SP group's summed CE,
    :mod:`ulysses_sp.train.engines`). Collective: every rank must call it with its shards of the same batches.
    """
    start = time.perf_counter()
    ce = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    done = 0
    engine.set_train(False)
    try:
        with torch.no_grad():
            for local in batches:
                if max_batches is not None and done >= max_batches:
                    break
                local = to_device(local, device)
                with autocast:
                    group_sum = engine.loss_sum(local)  # the same on every rank of the SP group
                if topology.sp_rank == 0:
                    ce += group_sum.double()
                count += (local["shift_labels"] != IGNORE_INDEX).sum().double()
                done += 1
    finally:
        engine.set_train(True)
    totals = comm.all_reduce(torch.stack([ce, count]), None)  # [2]: CE over the SP groups, tokens over all shards
    total_ce, tokens = float(totals[0]), int(totals[1])
    loss = total_ce / tokens if tokens else float("nan")
    return EvalResult(loss=loss, tokens=tokens, batches=done, seconds=time.perf_counter() - start)
