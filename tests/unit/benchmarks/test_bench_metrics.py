"""benchmarks/spbench: the MFU formula, the exposed-communication arithmetic, configuration specs."""

from __future__ import annotations

import random

import pytest
import torch

from benchmarks.spbench import comm, levers
from ulysses_sp.train import flops
from ulysses_sp.train.presets import build_config


def test_llama8b_matmul_params_and_step_flops():
    config = build_config("llama-8b", num_hidden_layers=4)
    with torch.device("meta"):
        import transformers

        model = transformers.AutoModelForCausalLM.from_config(config)
    d, dkv, ff, V = 4096, 1024, 14336, 128256
    per_layer = d * d * 2 + d * dkv * 2 + 3 * d * ff  # q, o, k, v, gate/up/down
    shape = flops.shape_of(model)
    assert shape.matmul_params == 4 * per_layer + V * d  # the head counts, the input embedding does not
    assert (shape.layers, shape.q_heads, shape.qk_head_dim, shape.v_head_dim) == (4, 32, 128, 128)
    S = 131072
    expected = 6 * shape.matmul_params * S + 4 * 6 * 256 * 32 * S * (S + 1) / 2
    assert flops.step_flops(shape, S, 1) == pytest.approx(expected, rel=1e-12)
    # the brief's forward count 2*2*(S^2/2)*d_attn per layer, times 3 for forward + backward
    assert flops.attention_flops(shape, S) == pytest.approx(4 * 3 * 2 * 2 * S * S / 2 * 4096, rel=1e-4)
    assert flops.mfu(989e12 * 4 * 2.0, 2.0, 4, 989e12) == pytest.approx(1.0)


def test_matmul_params_counts_zero3_partitioned_size():
    lin = torch.nn.Linear(8, 4, bias=False)
    lin.weight.data = torch.empty(0)
    lin.weight.ds_numel = 32
    assert flops.matmul_params(torch.nn.Sequential(lin)) == 32


def _brute_exposed(target, cover, step=0.5):
    def inside(ivs, t):
        return any(s <= t < e for s, e in ivs)

    end = max([e for _, e in target + cover] + [0])
    return sum(
        step
        for i in range(int(end / step))
        if inside(target, i * step + step / 2) and not inside(cover, i * step + step / 2)
    )


def test_uncovered_matches_brute_force():
    rng = random.Random(0)

    def intervals(n):
        return [(a, a + rng.randint(1, 8)) for a in (rng.randint(0, 60) for _ in range(n))]

    for _ in range(200):
        target, cover = intervals(rng.randint(0, 6)), intervals(rng.randint(0, 8))
        assert comm.uncovered(comm.merge(target), comm.merge(cover)) == _brute_exposed(target, cover)


def test_summarize_splits_a2a_and_other_comm():
    kernels = [
        ("ampere_bf16_gemm", 0.0, 10.0),
        ("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)", 8.0, 14.0),  # 2 us hidden, 4 exposed
        ("flash_fwd_kernel", 14.0, 20.0),
        ("ncclDevKernel_AllGather_RING_LL(x)", 18.0, 25.0),  # 2 hidden, 5 exposed
        ("Memcpy DtoD (Device -> Device)", 30.0, 31.0),
    ]
    out = comm.summarize(kernels)
    assert out["a2a_total_ms"] == pytest.approx(6e-3) and out["a2a_exposed_ms"] == pytest.approx(4e-3)
    assert out["comm_total_ms"] == pytest.approx(13e-3) and out["comm_exposed_ms"] == pytest.approx(9e-3)
    assert out["nccl_kinds"]["allgather"] == {"total_ms": pytest.approx(7e-3), "exposed_ms": pytest.approx(5e-3)}
    assert out["compute_busy_ms"] == pytest.approx(17e-3) and out["span_ms"] == pytest.approx(31e-3)
    assert out["top_kernels"][0][0] == "ampere_bf16_gemm"
    assert comm.kind("ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL") == "reducescatter"
    with pytest.raises(ValueError, match="no GPU kernels"):
        comm.summarize([])


def test_gpu_kernels_keeps_device_events_only():
    class Range:
        def __init__(self, s, e):
            self.start, self.end = s, e

    class Event:
        def __init__(self, name, dev, s, e):
            self.name, self.device_type, self.time_range = name, dev, Range(s, e)

    class Prof:
        def events(self):
            cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
            return [Event("aten::mm", cpu, 0, 5), Event("gemm", cuda, 1, 4)]

    assert comm.gpu_kernels(Prof()) == [("gemm", 1, 4)]


def test_config_specs():
    assert levers.parse("ours+cudnn+sac") == ("ours", frozenset({"cudnn", "sac"}))
    assert levers.parse("ours+tiled_mlp+offload") == ("ours", frozenset({"tiled_mlp", "offload"}))
    assert levers.parse("alst") == ("alst", frozenset())
    for bad, match in [
        ("mine", "side must be"),
        ("ours+ac_offload", "unknown lever"),
        ("alst+sac", "unknown lever"),
        ("ours+liger+tiled", "exclude"),
    ]:
        with pytest.raises(ValueError, match=match):
            levers.parse(bad)
    assert levers.available_or_reason(frozenset({"liger"}), "cpu", "sdpa") == "'liger' needs CUDA"
    assert levers.parse("ours+sac+ligerops+norms") == ("ours", frozenset({"sac", "ligerops", "norms"}))
    assert levers.available_or_reason(frozenset({"ligerops", "sac"}), "cpu", "sdpa") == "'ligerops' needs CUDA"
    assert "--attn sdpa" in levers.available_or_reason(frozenset({"cudnn"}), "cuda", "flash_attention_2")
    assert levers.available_or_reason(frozenset({"sac", "cudnn", "tiled_mlp", "offload"}), "cpu", "sdpa") is None
    assert levers.checkpoint_policy(frozenset({"sac"})) == "selective"
    assert levers.checkpoint_policy(frozenset({"cudnn"})) == "full"


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_profiling_problem_keeps_the_step_result(monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    result, summary = comm.profile_step(lambda: 7)  # no CUDA here: no kernel can be recorded
    assert result == 7 and "error" in summary


def test_profile_summaries_aggregate_over_ranks():
    from benchmarks.spbench import runner

    a = comm.summarize([("gemm", 0.0, 10.0), ("ncclDevKernel_SendRecv", 10.0, 14.0)])
    b = comm.summarize([("gemm", 0.0, 10.0), ("ncclDevKernel_SendRecv", 10.0, 16.0)])
    out = runner._aggregate([a, b])
    assert out["a2a_exposed_ms"] == {"max": pytest.approx(6e-3), "mean": pytest.approx(5e-3)}
    assert out["top_kernels_rank0"] == a["top_kernels"] and out["nccl_kinds_rank0"] == a["nccl_kinds"]
    assert runner._aggregate([a, {"error": "no trace"}]) == {"errors": {1: "no trace"}}
