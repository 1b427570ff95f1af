"""LoRA (a ``peft.get_peft_model`` model) under SP with DDP, FSDP2 and DeepSpeed ZeRO-3, against the
non-SP reference: the same PEFT model in one process running every DP replica's batch through
transformers' own loss (sum / N of the step). Per rank: the loss, every adapter gradient after the
engine's reduction, and no gradient on any frozen base weight; with selective checkpointing, the tiled
MLP (LoRA in its projections) and the RMSNorm recompute; under hybrid SP too (a ring of 2: ZeRO-3 at
(u, r) = (1, 2), FSDP2 at dp2 x (1, 2)). ``apply`` / ``remove``
/ ``is_applied`` through the PEFT wrapper, and the adapters SP cannot honour refused in one process
(no process group: a ValueError that comes before any collective)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from peft import IA3Config, LoraConfig, PromptTuningConfig, get_peft_model
from torch.nn.parallel import DistributedDataParallel

import ulysses_sp
from tests.distributed import harness
from tests.helpers import clone, tiny_model, tokens, tolerances
from ulysses_sp.core import comm
from ulysses_sp.core.apply import applied_topology
from ulysses_sp.core.wrappers import unwrap
from ulysses_sp.integrations import deepspeed as uds
from ulysses_sp.integrations.fsdp2 import shard_causal_lm
from ulysses_sp.loss.causal_lm import CausalLMLoss, causal_lm_loss, count_label_tokens
from ulysses_sp.memory.activation_checkpointing import enable_checkpointing
from ulysses_sp.memory.rms_norm import enable_rms_norm_recompute
from ulysses_sp.memory.tiled_mlp import tile_mlp

SEQ = 23  # not a multiple of the SP size
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_model(dtype=torch.float32, **lora) -> torch.nn.Module:
    """tiny-llama-gqa with LoRA (r=4) on every projection, identical on every rank; adapters initialised
    at random (lora_B too: with PEFT's default B = 0 the adapters' A gradients would all be 0)."""
    model = tiny_model("tiny-llama-gqa", dtype=dtype)
    torch.manual_seed(1)
    config = dict(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False)
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **{**config, **lora}))


def _batch(dp_rank: int, device) -> dict:
    """DP replica ``dp_rank``'s full batch: ids [2, SEQ], labels with a masked prompt."""
    ids = tokens(2, SEQ, seed=300 + dp_rank, device=device)
    labels = ids.clone()
    labels[0, :7] = -100
    return {"input_ids": ids, "labels": labels}


def _ddp(model, topo, local, n):
    """DDP over the world: its gradient mean over dp*sp ranks divides out the loss's P."""
    engine = DistributedDataParallel(CausalLMLoss(model, topo, tile_tokens=7))
    loss = engine(local, n)
    loss.backward()
    return loss, {name: p.grad for name, p in model.named_parameters()}


def _fsdp2(model, topo, local, n):
    loss_module = shard_causal_lm(model, topo, tile_tokens=7)
    assert all(comm.is_sharded(p) for p in model.parameters()), "FSDP2 did not shard every parameter"
    loss = loss_module(local, n)
    loss.backward()
    return loss, {name: None if p.grad is None else comm.full_tensor(p.grad) for name, p in model.named_parameters()}


def _zero3(model, topo, local, n):
    import deepspeed.ops
    from deepspeed.utils import safe_get_full_grad

    # no shm all-reduce op (test_deepspeed.py covers it): its JIT build, once per session, takes 30-100 s
    # on 2 cores and would dominate this file; DeepSpeed's reductions then run on the process group
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": next(model.parameters()).dtype == torch.bfloat16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = uds.initialize(
        CausalLMLoss(model, topo, tile_tokens=7), topo, config, optimizer=torch.optim.SGD(trainable, lr=1.0)
    )
    loss = engine(local, n)
    engine.backward(loss)
    grads = {name: safe_get_full_grad(p) for name, p in model.named_parameters()}
    uds.destroy(engine)
    return loss, grads


ENGINES = {"ddp": _ddp, "fsdp2": _fsdp2, "zero3": _zero3}


def _check(ctx, topo, engine: str, features: tuple[str, ...]):
    """One step of ``engine`` on a fresh LoRA model against the reference, with the memory ``features``
    (of ``selective``, ``tile_mlp``, ``rms_norm``) on."""
    label = f"{engine}{''.join(f' +{f}' for f in features)} dp{topo.dp_size}xsp{topo.sp_size} ring{topo.ring_size}"
    tol = tolerances(ctx.dtype)
    model = _lora_model(ctx.dtype).to(ctx.device)
    ref = clone(model)
    batches = [_batch(d, ctx.device) for d in range(topo.dp_size)]
    n_global = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    ref_losses = [ref(**b, num_items_in_batch=n_global).loss for b in batches]  # each replica's sum / N
    sum(ref_losses).backward()

    if "selective" in features:
        enable_checkpointing(model, "selective")
    if "tile_mlp" in features:
        tile_mlp(model, tile_tokens=5)
    if "rms_norm" in features:
        enable_rms_norm_recompute(model)
    assert ulysses_sp.apply(model, topo) is model
    assert ulysses_sp.is_applied(model) and applied_topology(model) is topo
    with pytest.raises(ValueError, match="already applied"):  # the wrapper and the model inside share one state
        ulysses_sp.apply(unwrap(model), topo)
    local = ulysses_sp.shard_batch(batches[topo.dp_rank], topo)
    n = count_label_tokens(local, topo)
    loss, grads = ENGINES[engine](model, topo, local, n)
    # this replica's sum / (N / dp): the engine's gradient mean over the dp*sp ranks gives the step's sum / N
    want = ref_losses[topo.dp_rank].detach() * topo.dp_size
    torch.testing.assert_close(loss.detach().float(), want, **tol, msg=lambda m: f"{label} loss: {m}")

    ref_params = dict(ref.named_parameters())
    assert sorted(grads) == sorted(ref_params), f"{label}: the engine changed the parameter names"
    adapters = [name for name, p in ref_params.items() if p.requires_grad]
    assert adapters and all(".lora_" in name for name in adapters), adapters
    for name, grad in grads.items():
        r = ref_params[name]
        if not r.requires_grad:
            assert grad is None, f"{label} {name}: a frozen base weight got a gradient"
            continue
        assert grad is not None, f"{label} {name}: no gradient under SP"
        assert torch.count_nonzero(r.grad) > 0, f"{name}: a zero reference gradient checks nothing"
        scale = max(1.0, r.grad.abs().max().item())
        torch.testing.assert_close(
            grad.float(), r.grad, rtol=tol["rtol"], atol=tol["atol"] * scale, msg=lambda m: f"{label} {name}: {m}"
        )
    if engine == "ddp":  # the model is still whole: SP comes off through the wrapper
        ulysses_sp.remove(model)
        assert not ulysses_sp.is_applied(model) and not ulysses_sp.is_applied(unwrap(model))
        assert unwrap(model).config._attn_implementation == "sdpa"
        with torch.no_grad():
            torch.testing.assert_close(model(**batches[0]).loss, ref(**batches[0]).loss, **tol)


def _body(ctx, layouts):
    for sp_size, ring_size, cases in layouts:
        topo = ulysses_sp.init_sp(sp_size, ring_size)
        for case in cases:
            _check(ctx, topo, *case)


ALL = ("selective", "tile_mlp", "rms_norm")
# (engine, memory features on) per topology
SP2 = [("ddp", ALL), ("fsdp2", ALL), ("zero3", ALL)]
DP2_SP2 = [("ddp", ALL), ("fsdp2", ALL)]  # ZeRO-3's reduction over dp x sp: distributed/integrations/test_deepspeed.py


@pytest.mark.parametrize(
    "nproc, layouts",
    [(2, [(2, 1, SP2), (2, 2, [("zero3", ALL)])]), (4, [(2, 1, DP2_SP2), (2, 2, [("fsdp2", ALL)])])],
    ids=["sp2+ring2", "dp2xsp2+dp2xring2"],
)
def test_lora_adapter_grads_match_reference(nproc, layouts):
    harness.run(_body, nproc, layouts)


# --- refusals: one process, no process group -----------------------------------------------------


def _topo(sp: int = 2, dp: int = 1):
    return SimpleNamespace(sp_size=sp, dp_size=dp, world_size=sp * dp)


def _peft(config):
    return get_peft_model(tiny_model("tiny-llama-gqa"), config)


@pytest.mark.parametrize(
    "config, match",
    [
        (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), "is prompt learning"),
        (IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"]), r"supports \['LORA'\]"),
        (LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], alora_invocation_tokens=[5]), "activated LoRA"),
    ],
    ids=["prompt-tuning", "ia3", "alora"],
)
def test_adapters_sp_cannot_honour_are_refused(config, match):
    model = _peft(config)
    with pytest.raises(ValueError, match=match):
        ulysses_sp.apply(model, _topo())
    assert not ulysses_sp.is_applied(model)
    with pytest.raises(ValueError, match=match):
        shard_causal_lm(model, _topo())
    with pytest.raises(ValueError, match=match):
        uds.initialize(model, _topo(), {"train_micro_batch_size_per_gpu": 1})


def test_per_sample_adapter_names_are_refused():
    model = _lora_model()
    ids = tokens(2, 8)
    batch = {"input_ids": ids, "position_ids": torch.arange(8).expand(2, -1), "shift_labels": ids}
    with pytest.raises(ValueError, match=r"\['adapter_names'\].*model.set_adapter"):
        causal_lm_loss(model, dict(batch, adapter_names=["default", "default"]), _topo())


def test_lora_dropout_is_refused_by_the_tiled_mlp():
    model = _lora_model(lora_dropout=0.1)
    with pytest.raises(ValueError, match=r"gate_proj.lora_dropout.default.*lora_dropout=0"):
        tile_mlp(model)
    tile_mlp(_lora_model(lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))  # no adapter in the MLP
