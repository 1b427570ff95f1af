"""DeepSpeed integration: at ZeRO stages 0-3 (world 2 sp2, world 4 dp2 x sp2, and hybrid SP with a ring
of 2: (u, r) = (1, 2) at ZeRO-1 and ZeRO-3, dp2 x (1, 2) at ZeRO-2) the gradient DeepSpeed
reduces, and the update its optimizer applies, equal the non-SP reference (mean over DP replicas of
each replica's gradient of its full-batch loss) for every parameter; with binding gradient clipping,
gradient accumulation, CPU optimizer offload, bf16 (stages 0, 1 with DeepSpeed's BF16_Optimizer, 3) and a
loss-returning wrapper module. Config and SP-size errors; other models in the process untouched.

The SP loss follows loss/causal_lm.py's convention: the full-sequence loss on every SP rank, through a
differentiable all-reduce of the local CE sum. The update is measured with torch SGD at LR=1e5, so
that ``(before - after) / LR`` is the applied gradient to fp32 precision whatever DeepSpeed's
internals (and ``safe_get_full_grad``) do.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import ulysses_sp
from tests.distributed import harness
from tests.helpers import ROOT, clone, tiny_model, tokens
from ulysses_sp.core import comm, layout
from ulysses_sp.integrations import deepspeed as uds

B, S, LR = 2, 16, 1e5
CONFIGS = ["zero0", "zero1", "zero2", "zero3", "zero3_offload"]
CONFIG_DIR = Path(ROOT) / "configs" / "deepspeed"


def _labels(ids: torch.Tensor) -> torch.Tensor:
    """Next-token labels of the full sequence, shifted before sharding; the last one ignored. [B, S]"""
    return torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)


def _reference(model, micro_batches, topo, clip: float) -> tuple[dict, dict]:
    """(gradient, clipped gradient) of the non-SP model: mean over the accumulation of each micro-batch's
    mean token loss, then mean over DP replicas."""
    ref = clone(model)
    for ids in micro_batches:
        logits = ref(input_ids=ids).logits
        loss = F.cross_entropy(logits.flatten(0, 1), _labels(ids).flatten(), ignore_index=-100)
        (loss / len(micro_batches)).backward()
    grads = {n: comm.all_reduce(p.grad, topo.dp_group) / topo.dp_size for n, p in ref.named_parameters()}
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()
    coef = min(1.0, clip / (norm + 1e-6)) if clip else 1.0
    if clip:
        assert coef < 0.5, f"clipping at {clip} must bind (grad norm {norm})"
    return grads, {n: g * coef for n, g in grads.items()}


def _assert_close(got: torch.Tensor, want: torch.Tensor, label: str, dtype: str) -> None:
    """fp32: rtol 1e-5, atol 1e-5 of the tensor's largest entry (the reductions' summation-order noise
    is ~1e-7 of it; the bugs this guards against are O(1) ratios). bf16: 2e-2 likewise."""
    tol = 1e-5 if dtype == "fp32" else 2e-2
    torch.testing.assert_close(
        got.float(), want, rtol=tol, atol=tol * want.abs().max().item(), msg=lambda m: f"{label}: {m}"
    )


def _full(p) -> torch.Tensor:
    """The parameter's full fp32 master copy where DeepSpeed keeps one, else the parameter."""
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(p)  # collective at stage 3
    return (p if full is None else full).detach().float()


def _sp_loss(logits: torch.Tensor, labels: torch.Tensor, topo) -> torch.Tensor:
    """loss/causal_lm.py's convention: the micro-batch's token-mean loss on every SP rank.
    logits [B, s, V], labels [B, s]."""
    local = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    return comm.all_reduce_autograd_sum(local, topo.sp_group) / (B * (S - 1))


class _LossModule(torch.nn.Module):
    """A model whose forward returns the loss: how a trainer hands model and loss to an engine."""

    def __init__(self, model, topo):
        super().__init__()
        self.model, self.topo = model, topo

    def forward(self, input_ids, position_ids, labels):
        return _sp_loss(self.model(input_ids=input_ids, position_ids=position_ids).logits, labels, self.topo)


def _check_stage(ctx, topo, name: str, ga: int = 1, clip: float = 0.0, dtype: str = "fp32", wrapped: bool = False):
    """One optimizer step with the shipped config ``name`` (fp32 or bf16) against the reference;
    ``wrapped``: DeepSpeed gets a :class:`_LossModule` around the model (SP applied beforehand)."""
    from deepspeed.utils import safe_get_full_grad

    label = f"{name} {dtype} ga={ga} clip={clip} ring={topo.ring_size}{' wrapped' if wrapped else ''}"
    model = tiny_model("tiny-llama").to(ctx.device)
    micro_batches = [tokens(B, S, seed=100 + 10 * topo.dp_rank + k, device=ctx.device) for k in range(ga)]
    want, want_clipped = _reference(model, micro_batches, topo, clip)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    if wrapped:
        ulysses_sp.apply(model, topo)
    engine, *_ = uds.initialize(
        _LossModule(model, topo) if wrapped else model,
        topo,
        _config(name, ga, clip, dtype),
        optimizer=torch.optim.SGD(model.parameters(), lr=LR),
    )
    _check_shm_released(ctx)

    idx = layout.local_index(S, topo.sp_size, topo.ring_size, topo.sp_rank, ctx.device)  # [s] this rank's positions
    for ids in micro_batches:
        inputs = dict(input_ids=ids[:, idx], position_ids=idx.expand(B, -1))
        if wrapped:
            loss = engine(**inputs, labels=_labels(ids)[:, idx])
        else:
            loss = _sp_loss(engine(**inputs).logits, _labels(ids)[:, idx], topo)
        engine.backward(loss)
        if engine.is_gradient_accumulation_boundary():
            grads = {n: safe_get_full_grad(p).clone() for n, p in model.named_parameters()}
        engine.step()  # every micro-batch: DeepSpeed steps the optimizer at the boundary only
    for n, p in model.named_parameters():
        _assert_close(grads[n], want[n], f"{label} {n} (reduced gradient)", dtype)
        _assert_close((before[n] - _full(p)) / LR, want_clipped[n], f"{label} {n} (applied update / LR)", dtype)
    ulysses_sp.remove(model)


def _config(name: str, ga: int, clip: float, dtype: str) -> dict:
    """A shipped config with the test's batch, clipping and precision; torch SGD replaces its optimizer
    (DeepSpeed's CPU Adam needs a C++ build, docs/deepspeed.md)."""
    config = uds.load_config(CONFIG_DIR / f"{name}.json")
    for key in ("sequence_parallel_size", "optimizer"):
        config.pop(key, None)
    config.update(
        train_micro_batch_size_per_gpu=B,
        gradient_accumulation_steps=ga,
        gradient_clipping=clip,
        zero_allow_untested_optimizer=True,
        zero_force_ds_cpu_optimizer=False,
    )
    config["bf16"] = {"enabled": dtype == "bf16"}
    if dtype == "bf16" and name == "zero1":
        config["data_types"] = {"grad_accum_dtype": "fp32"}  # DeepSpeed's BF16_Optimizer (the DS#7833 path)
    return config


def _check_fused_head_zero3(ctx, topo):
    """CausalLMLoss's fused-kernel path reads the head's weight directly; under ZeRO-3 it must be
    gathered for the loss module (initialize registers it) and its gradient reduced like any other.
    liger needs CUDA, so a torch kernel with the same contract (full weight in, CE sum out) stands in."""
    from deepspeed.utils import safe_get_full_grad

    from ulysses_sp.loss import causal_lm as loss_module
    from ulysses_sp.loss import tiled_ce

    calls = []

    def fused_stand_in(hidden, labels, head, transform):
        calls.append(tuple(head.weight.shape))
        return F.cross_entropy(F.linear(hidden, head.weight).float(), labels, ignore_index=-100, reduction="sum")

    loss_module.liger_unsupported_reason = lambda hidden, head, transform: tiled_ce.head_weight_unavailable_reason(
        head.weight
    )
    loss_module.liger_cross_entropy_sum = fused_stand_in
    model = tiny_model("tiny-llama").to(ctx.device)
    ids = tokens(B, S, seed=500 + topo.dp_rank, device=ctx.device)
    want, _ = _reference(model, [ids], topo, 0.0)
    ulysses_sp.apply(model, topo)
    engine, *_ = uds.initialize(
        ulysses_sp.CausalLMLoss(model, topo, use_liger=True),
        topo,
        _config("zero3", 1, 0.0, "fp32"),
        optimizer=torch.optim.SGD(model.parameters(), lr=LR),
    )
    head = model.get_output_embeddings()
    assert tiled_ce.head_weight_unavailable_reason(head.weight) is not None, "outside the loss the head is partitioned"
    batch = ulysses_sp.shard_batch({"input_ids": ids, "labels": ids}, topo)
    engine.backward(engine(batch, None))
    assert calls == [(model.config.vocab_size, model.config.hidden_size)], calls
    for n, p in model.named_parameters():
        _assert_close(safe_get_full_grad(p), want[n], f"fused head zero3 {n}", "fp32")
    ulysses_sp.remove(model)


def _body_stages(ctx, sp_size: int, cases, other_models: bool, ring_cases=()):
    if ctx.device.type == "cpu":
        # as under the deepspeed launcher: all ranks on one host, which turns on DeepSpeed's shm all-reduce
        box = [str(20000 + os.getpid() % 40000)]  # a name of this run's own
        dist.broadcast_object_list(box, src=0)
        port = box[0]
        os.environ.update(LOCAL_SIZE=str(ctx.world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    topo = ulysses_sp.init_sp(sp_size)
    if other_models:
        _check_other_models(ctx, topo)
        _check_fused_head_zero3(ctx, topo)
    for case in cases:
        _check_stage(ctx, topo, *case)
    ring = ulysses_sp.init_sp(sp_size, 2)  # hybrid SP: (u, r) = (sp_size / 2, 2)
    for case in ring_cases:
        _check_stage(ctx, ring, *case)


def _check_shm_released(ctx) -> None:
    """After initialize on CPU: this process maps DeepSpeed's /dev/shm all-reduce segment of every rank
    (else this checks nothing), none of them is left with a name (RAM until reboot otherwise), and the
    shm all-reduce still sums correctly."""
    if ctx.device.type != "cpu":
        return
    comm.barrier()  # every rank has unlinked its own segment
    with open("/proc/self/maps") as maps:
        mapped = {line.split(maxsplit=5)[5].strip() for line in maps if "deepspeed_allreduce_buffer_" in line}
    assert len(mapped) == ctx.world_size, f"expected one DeepSpeed shm segment per rank mapped, got {sorted(mapped)}"
    named = sorted(m for m in mapped if not m.endswith("(deleted)"))
    assert not named, f"DeepSpeed /dev/shm segments left named (RAM until reboot): {named}"
    x = torch.full((8,), float(ctx.rank + 1))
    torch.ops.deepspeed.inference_all_reduce_(x)
    assert torch.equal(x, torch.full((8,), ctx.world_size * (ctx.world_size + 1) / 2)), x


def _check_other_models(ctx, topo):
    """A model built before, and one built after, a ZeRO-3 engine with SP: unchanged and unpartitioned."""
    other = tiny_model("tiny-llama", seed=3).to(ctx.device)
    ids = tokens(B, S, device=ctx.device)
    with torch.no_grad():
        before = other(input_ids=ids).logits
    _check_stage(ctx, topo, "zero3", wrapped=True)
    later = tiny_model("tiny-llama", seed=4)
    assert not any(hasattr(p, "ds_id") for m in (other, later) for p in m.parameters()), "a model was ZeRO-partitioned"
    assert other.config._attn_implementation == "sdpa" and later.config._attn_implementation == "sdpa"
    assert not other.model._forward_pre_hooks, "the other model got a forward pre-hook"
    with torch.no_grad():
        torch.testing.assert_close(other(input_ids=ids).logits, before, rtol=0, atol=0)


# (config, gradient accumulation, clip (binding when > 0), dtype)
STAGES_WORLD2 = [
    ("zero0", 1, 0.0, "fp32"),
    ("zero1", 2, 0.0, "fp32"),
    ("zero2", 1, 0.05, "fp32"),
    ("zero3", 2, 0.05, "fp32"),
    ("zero3_offload", 1, 0.05, "fp32"),
    ("zero0", 1, 0.05, "bf16"),
    ("zero1", 1, 0.0, "bf16"),
    ("zero3", 1, 0.0, "bf16"),
]
STAGES_WORLD4 = [
    ("zero0", 1, 0.05, "fp32"),
    ("zero1", 1, 0.05, "fp32"),
    ("zero2", 2, 0.0, "fp32"),
    ("zero3", 1, 0.05, "fp32"),
]


RING_WORLD2 = [("zero1", 1, 0.0, "fp32"), ("zero3", 2, 0.05, "fp32")]  # (u, r) = (1, 2)
RING_WORLD4 = [("zero2", 1, 0.05, "fp32")]  # dp2 x (1, 2)


def test_stages_sp2_and_other_models():
    harness.run(_body_stages, 2, 2, STAGES_WORLD2, True, RING_WORLD2)


def test_stages_dp2_sp2():
    harness.run(_body_stages, 4, 2, STAGES_WORLD4, False, RING_WORLD4)


# --- config: no processes needed -----------------------------------------------------------------


def _topo(sp: int, dp: int):
    return SimpleNamespace(sp_size=sp, dp_size=dp, world_size=sp * dp)


def test_initialize_needs_an_sp_model():
    with pytest.raises(ValueError, match="holds no model with ulysses_sp applied"):
        uds.initialize(torch.nn.Linear(2, 2), _topo(sp=2, dp=1), {"train_micro_batch_size_per_gpu": 1})


def test_load_config_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        uds.load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 3,}}')
    with pytest.raises(ValueError, match="is not valid JSON"):
        uds.load_config(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        uds.load_config(bad)
    original = {"zero_optimization": {"stage": 2}}
    loaded = uds.load_config(original)
    loaded["zero_optimization"]["stage"] = 3
    assert original["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs(name):
    config = uds.load_config(CONFIG_DIR / f"{name}.json")
    prepared = uds.prepare_config(
        config, _topo(config.get("sequence_parallel_size", 1), 2), micro_batch_size=2, gradient_accumulation_steps=3
    )
    assert "sequence_parallel_size" not in prepared
    assert (
        prepared["train_batch_size"],
        prepared["train_micro_batch_size_per_gpu"],
        prepared["gradient_accumulation_steps"],
    ) == (12, 2, 3)
    assert prepared["zero_optimization"]["stage"] == int(name[4])


def test_prepare_config_batch_and_errors():
    topo = _topo(sp=4, dp=2)
    cfg = uds.prepare_config({"train_batch_size": 16, "train_micro_batch_size_per_gpu": "auto"}, topo)
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (8, 1)
    cfg = uds.prepare_config({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2}, topo)
    assert cfg["gradient_accumulation_steps"] == 4
    with pytest.raises(ValueError, match="dp = world / sp"):
        uds.prepare_config(
            {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1}, topo
        )
    with pytest.raises(ValueError, match="needs train_micro_batch_size_per_gpu or train_batch_size"):
        uds.prepare_config({}, topo)
    with pytest.raises(ValueError, match="does not match the topology"):
        uds.prepare_config({"train_micro_batch_size_per_gpu": 1, "sequence_parallel_size": 2}, topo)
    with pytest.raises(ValueError, match="does not match the topology"):
        uds.prepare_config({"train_micro_batch_size_per_gpu": 1, "data_parallel_size": 8}, topo)
    # our ring size: checked against the topology and removed ("auto" was resolved before the topology)
    ring = SimpleNamespace(sp_size=4, dp_size=2, world_size=8, ring_size=2)
    for value in (2, "auto"):
        cfg = uds.prepare_config({"train_micro_batch_size_per_gpu": 1, "sequence_parallel_ring_size": value}, ring)
        assert "sequence_parallel_ring_size" not in cfg
    with pytest.raises(
        ValueError, match=r"ring_size\": 4 in the DeepSpeed config does not match the topology's ring size 2"
    ):
        uds.prepare_config({"train_micro_batch_size_per_gpu": 1, "sequence_parallel_ring_size": 4}, ring)
    with pytest.raises(ValueError, match=r"\"auto\" values at \['optimizer.params.lr'\]"):
        uds.prepare_config({"train_micro_batch_size_per_gpu": 1, "optimizer": {"params": {"lr": "auto"}}}, topo)
