"""Spawn helpers for the distributed tests: one process per rank, gloo on CPU or NCCL on GPUs.

The backend comes from ``ULYSSES_SP_TEST_BACKEND`` (``gloo`` by default, ``nccl`` for the GPU run,
see tests/distributed/run_gpu.sh), so the same test bodies run on both. Bodies must be module-level
functions (spawn pickles them by name); they receive ``(ctx, *args)`` and assert inside the worker:
a failed assertion on any rank fails the test with that rank's traceback.
"""

from __future__ import annotations

import faulthandler
import os
import tempfile
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def backend() -> str:
    return os.environ.get("ULYSSES_SP_TEST_BACKEND", "gloo")


def on_gpu() -> bool:
    return backend() == "nccl"


def cpu_only(reason: str):
    """Mark tests that are CPU/gloo by design (skipped by the NCCL run, with the reason)."""
    import pytest

    return pytest.mark.skipif(on_gpu(), reason=f"CPU-only: {reason}")


@dataclass
class Ctx:
    rank: int
    world_size: int
    device: torch.device

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the parity tests: fp32, or bf16 when ULYSSES_SP_TEST_DTYPE=bf16."""
        return torch.bfloat16 if os.environ.get("ULYSSES_SP_TEST_DTYPE") == "bf16" else torch.float32


def _worker(rank: int, world_size: int, store_path: str, fn, args) -> None:
    # a native crash (SIGABRT, SIGSEGV) prints every thread's Python stack: CI once saw a rank abort on
    # glibc heap corruption with nothing else to go on
    faulthandler.enable(all_threads=True)
    # a FileStore rendezvous: no TCP port to race for between concurrent test runs
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    init = dict(init_method=f"file://{store_path}", rank=rank, world_size=world_size, timeout=timedelta(seconds=300))
    if on_gpu():
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        dist.init_process_group("nccl", device_id=device, **init)
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
        dist.init_process_group("gloo", **init)
    fn(Ctx(rank, world_size, device), *args)
    # every rank done before teardown: no collective is in flight when the process group (and the
    # backend's threads) go away; a failing body skips this and its process exits with the error
    dist.barrier()
    dist.destroy_process_group()


def run(fn, world_size: int, *args) -> None:
    """Run ``fn(ctx, *args)`` on ``world_size`` fresh processes; re-raise the first failure."""
    if on_gpu() and torch.cuda.device_count() < world_size:
        import pytest

        pytest.skip(f"needs {world_size} GPUs, found {torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory(prefix="ulysses_sp_store_") as tmp:
        mp.start_processes(
            _worker,
            args=(world_size, os.path.join(tmp, "store"), fn, args),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
