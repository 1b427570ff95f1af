"""benchmarks/spbench/runner.py on 2 CPU ranks with stand-in sides: every rank reaches the same
verdict when a configuration fails (OOM on all ranks, or a build error on one rank only), and the
max-length search brackets the largest fitting length to the granularity."""

from __future__ import annotations

import torch
import torch.distributed as dist

from benchmarks.spbench import runner
from benchmarks.spbench.workload import Workload
from tests.distributed.harness import cpu_only, run
from tests.helpers import tiny_model

pytestmark = cpu_only("CPU/gloo checks of the benchmark runner's OOM agreement")


class _Engine:
    def get_global_grad_norm(self):
        return 1.0


_MODEL = []


class _Run:
    def __init__(self, oom_above: int, seq_len: int):
        if not _MODEL:
            _MODEL.append(tiny_model("tiny-llama"))
        self.model, self.engine = _MODEL[0], _Engine()
        self.oom = seq_len > oom_above

    def forward_backward(self):
        if self.oom:  # like a real OOM: every rank of the SP group fails at the same allocation
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        dist.all_reduce(torch.ones(1))
        return torch.tensor(2.5)

    def update(self):
        pass

    def close(self):
        pass


class _Side:
    name = "ours"

    def __init__(self, oom_above=1 << 30, fail_rank=None):
        self.oom_above, self.fail_rank, self.built = oom_above, fail_rank, []

    def prepare(self, levers, seq_len):
        if dist.get_rank() == self.fail_rank:
            raise ValueError("only this rank fails")
        self.built.append(seq_len)
        return _Run(self.oom_above, seq_len)


def _workload():
    return Workload(
        model="tiny-llama",
        layers=None,
        attn="sdpa",
        dtype=torch.float32,
        device=torch.device("cpu"),
        sp=2,
        batch_size=1,
        zero_stage=3,
        lr=1e-5,
        seed=0,
        engine="deepspeed",
    )


def _body(ctx):
    runner.free_memory = lambda device: None  # gc.collect costs ~0.5 s here and frees nothing of the stand-ins
    wl, measure = _workload(), runner.Measure(warmup=1, steps=2, profile=False)
    ok = runner.run_config(_Side(), "ours", frozenset(), 64, wl, measure, 1e12)
    assert ok["status"] == "ok" and ok["losses"] == [2.5, 2.5, 2.5] and ok["step_s"] > 0
    assert ok["tok_s_per_gpu"] > 0 and 0 < ok["mfu"] < 1 and ok["zero_partition_ranks"] is None
    assert 0 < ok["peak_fwd_bwd_gib"] <= ok["peak_mem_abs_gib"]

    oom = runner.run_config(_Side(oom_above=32), "ours", frozenset(), 64, wl, measure, 1e12)
    assert oom["status"] == "oom" and "OutOfMemoryError" in oom["errors"][ctx.rank]

    one = runner.run_config(_Side(fail_rank=1), "ours", frozenset(), 64, wl, measure, 1e12)
    assert one["status"] == "error" and list(one["errors"]) == [1] and "only this rank" in one["errors"][1]

    side = _Side(oom_above=5000)
    search = runner.Search(start=1024, max_len=1 << 20, granularity=256, budget_s=1e6, steps=1)
    found = runner.search_max_len(side, "ours", frozenset(), wl, search, 1e12, log=lambda *_: None)
    assert (found["max_fit"], found["first_oom"], found["limited_by"]) == (4864, 5120, "oom"), found
    assert side.built == [1024, 2048, 4096, 8192, 6144, 5120, 4608, 4864]

    small = runner.search_max_len(_Side(oom_above=300), "ours", frozenset(), wl, search, 1e12, log=lambda *_: None)
    assert (small["max_fit"], small["first_oom"]) == (256, 512)  # the start did not fit: halved

    capped = runner.search_max_len(
        _Side(), "ours", frozenset(), wl, runner.Search(1024, 4096, 256, 1e6, 1), 1e12, log=lambda *_: None
    )
    assert (capped["max_fit"], capped["limited_by"]) == (4096, "search_max")


def test_failures_agreed_and_search_brackets():
    run(_body, 2)
