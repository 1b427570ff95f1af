"""What the run reports: a JSON line per step (``--metrics``), the progress bar with a moving-average
tok/s, and the totals behind the end-of-run summary."""

from __future__ import annotations

import json
import os
import resource
from collections import deque

import torch


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: CUDA's allocator peak, or the resident set's peak on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


class MetricsFile:
    """JSON lines appended to ``path`` (rank 0 only; ``path`` None: nothing is written)."""

    def __init__(self, path: str | None, rank: int):
        self.file = None
        if path and rank == 0:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.file = open(path, "a")

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class Throughput:
    """Tokens, seconds and model FLOPs of the steps run: over the last ``window`` steps (the bar's
    tok/s, which per step would jump with every short or long batch), over the whole run, and the
    median step's rates (the summary's: the first step of each new batch shape pays for warm-up and
    kernel selection, tens of seconds on a GPU, which would drag a short run's mean far below what the
    run does)."""

    def __init__(self, window: int = 20):
        self.recent: deque[tuple[float, float]] = deque(maxlen=window)
        self.steps, self.tokens, self.seconds = 0, 0, 0.0
        self.rates: list[tuple[float, float]] = []  # (tokens/s, model FLOP/s) of every step

    def add(self, tokens: int, seconds: float, flops: float) -> None:
        self.recent.append((tokens, seconds))
        self.steps += 1
        self.tokens += tokens
        self.seconds += seconds
        self.rates.append((tokens / max(seconds, 1e-9), flops / max(seconds, 1e-9)))

    @property
    def recent_tok_per_s(self) -> float:
        return sum(t for t, _ in self.recent) / max(sum(s for _, s in self.recent), 1e-9)

    def median_rates(self) -> tuple[float, float]:
        """(tokens/s, model FLOP/s) of the median step (by tokens/s)."""
        ordered = sorted(self.rates)
        return ordered[(len(ordered) - 1) // 2]


def progress_bar(total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)
