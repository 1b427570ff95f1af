"""What the run reports per step: a JSON line per step (``--metrics``) and the progress bar."""

from __future__ import annotations

import json
import os
import resource

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


def progress_bar(total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)
