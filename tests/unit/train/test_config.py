"""Errors that need no process group: the trainer's flag checks (raised before distributed init, so
every rank fails alike), models ulysses_sp refuses, inputs, checkpoints and the failure reports.
The messages are the ones docs/troubleshooting.md lists."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import transformers

import ulysses_sp
from ulysses_sp.core.attention import UlyssesAttention
from ulysses_sp.data.text import Documents
from ulysses_sp.train import checkpoints as checkpoint
from ulysses_sp.train import failures
from ulysses_sp.train.cli import parse_config
from ulysses_sp.train.evaluation import is_heldout, split_heldout
from ulysses_sp.train.plan import check_device_dtype, check_seq_len
from ulysses_sp.train.presets import build_config
from ulysses_sp.train.run import run

TOPO2 = SimpleNamespace(sp_size=2, sp_rank=0, dp_size=1, dp_rank=0)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--steps", "0"], r"--steps must be an integer >= 1, got 0"),
        (["--batch-size", "0"], r"--batch-size must be an integer >= 1, got 0"),
        (["--grad-accum", "-1"], r"--grad-accum must be an integer >= 1, got -1"),
        (["--seq-len", "0"], r"--seq-len must be an integer >= 1, got 0"),
        (["--warmup-steps", "-2"], r"--warmup-steps must be an integer >= 0 \(0 turns it off\), got -2"),
        (["--seed", "-1"], r"--seed must be an integer >= 0"),
        (["--lr", "0"], r"--lr must be > 0, got 0.0"),
        (["--max-grad-norm", "-1"], r"--weight-decay and --max-grad-norm must be >= 0"),
        (["--timeout-s", "0"], r"--timeout-s must be > 0 seconds .* got 0.0"),
        (["--save-every", "5"], r"--save-every 5 needs --save-dir DIR"),
        (["--eval-every", "2", "--eval-batches", "0"], r"--eval-batches must be an integer >= 1 .* got 0"),
        (["--eval-batches", "3"], r"--eval-batches 3 has no effect without --eval-every N"),
        (["--eval-every", "2", "--eval-fraction", "1.5"], r"--eval-fraction must be in \(0, 1\).* got 1.5"),
    ],
)
def test_trainer_flags(argv, match):
    with pytest.raises(ValueError, match=match):
        parse_config(argv)


def test_bad_flags_fail_before_distributed_init():
    with pytest.raises(ValueError, match="--steps must be"):
        run(parse_config(["--steps", "0", "--device", "cpu"]))
    assert not dist.is_initialized()


def test_device_and_dtype(monkeypatch):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"--device cuda was given but no CUDA device is visible.*--device cpu"):
            check_device_dtype("cuda", torch.float32)
    with pytest.raises(ValueError, match=r"--dtype fp16 is not supported on CPU.*use --dtype fp32 or bf16"):
        check_device_dtype("cpu", torch.float16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-32GB")
    with pytest.raises(ValueError, match=r"--dtype bf16 needs a GPU with bfloat16 support.*Tesla V100.*--dtype fp16"):
        check_device_dtype("cuda", torch.bfloat16)
    check_device_dtype("cuda", torch.float16)


def test_sequence_longer_than_max_positions():
    rope = build_config("tiny-llama", max_position_embeddings=64)
    check_seq_len(rope, 64, allow_longer=False)
    with pytest.raises(
        ValueError,
        match=r"--seq-len 65 exceeds max_position_embeddings=64 of LlamaConfig; use "
        r"--seq-len <= 64, or pass --allow-longer-than-max-positions",
    ):
        check_seq_len(rope, 65, allow_longer=False)
    with pytest.warns(UserWarning, match="RoPE positions past the model's trained range"):
        check_seq_len(rope, 65, allow_longer=True)
    absolute = transformers.GPT2Config(n_positions=32, n_embd=16, n_layer=1, n_head=2, vocab_size=256)
    with pytest.raises(
        ValueError,
        match=r"--seq-len 40 exceeds max_position_embeddings=32 of GPT2Config, which has "
        r"learned absolute position embeddings",
    ):
        check_seq_len(absolute, 40, allow_longer=True)


def _model(config):
    return transformers.AutoModelForCausalLM.from_config(config)


def test_models_ulysses_sp_refuses():
    mamba = _model(transformers.MambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, state_size=4))
    with pytest.raises(
        ValueError,
        match=r"MambaForCausalLM has layers of type \['linear_attention'\]; .*supports only "
        r"\['full_attention', 'sliding_attention'\]",
    ):
        ulysses_sp.apply(mamba, TOPO2)
    hybrid = _model(
        transformers.Lfm2Config(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            layer_types=["conv", "full_attention"],
        )
    )
    with pytest.raises(ValueError, match=r"Lfm2ForCausalLM has layers of type \['conv'\]"):
        ulysses_sp.apply(hybrid, TOPO2)
    bloom = _model(transformers.BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=4))
    with pytest.raises(
        ValueError,
        match=r"BloomForCausalLM does not route attention through transformers' "
        r"AttentionInterface",
    ):
        ulysses_sp.apply(bloom, TOPO2)
    uneven_kv = _model(build_config("tiny-llama", num_attention_heads=8, num_key_value_heads=3, hidden_size=64))
    with pytest.raises(ValueError, match=r"num_attention_heads=8, not a multiple of num_key_value_heads=3"):
        ulysses_sp.apply(uneven_kv, TOPO2)
    few_heads = _model(build_config("tiny-llama", num_attention_heads=2, num_key_value_heads=2, hidden_size=32))
    with pytest.raises(ValueError, match=r"sp_size=4 exceeds num_attention_heads=2: .* Use sp_size <= 2"):
        ulysses_sp.apply(few_heads, SimpleNamespace(sp_size=4, sp_rank=0))
    with pytest.raises(
        ValueError,
        match=r"attention implementation 'paged_attention' is not supported by ulysses_sp; "
        r"use one of \['sdpa'",
    ):
        UlyssesAttention(TOPO2, "paged_attention")
    for model in (mamba, hybrid, bloom, uneven_kv, few_heads):
        assert not ulysses_sp.is_applied(model)


def test_negative_position_ids_in_a_batch():
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "position_ids": torch.tensor([[0, 1, -1, 2]])}
    with pytest.raises(ValueError, match=r"position_ids hold negative values \(min -1\)"):
        ulysses_sp.shard_batch(batch, TOPO2)


def test_sequence_shorter_than_sp_is_padded_not_refused():
    batch = {"input_ids": torch.tensor([[7, 8]]), "labels": torch.tensor([[7, 8]])}
    shards = [ulysses_sp.shard_batch(batch, SimpleNamespace(sp_size=4, sp_rank=r)) for r in range(4)]
    assert [sh["input_ids"].tolist() for sh in shards] == [[[7]], [[8]], [[0]], [[0]]]
    assert [sh["shift_labels"].tolist() for sh in shards] == [[[8]], [[-100]], [[-100]], [[-100]]]
    assert [sh["position_ids"].tolist() for sh in shards] == [[[0]], [[1]], [[2]], [[3]]]


def _save(path, step=3, **meta):
    os.makedirs(path, exist_ok=True)
    data = {
        "format": checkpoint.FORMAT,
        "step": step,
        "engine": "torch",
        "zero_stage": None,
        "world_size": 2,
        "sp_size": 2,
        "dp_size": 1,
        "run": {"seed": 1, "seq_len": 8, "pack": False, "heldout_fraction": None},
        "model_config": {"hidden_size": 64},
        "data": {},
    }
    data.update(meta)
    with open(os.path.join(path, checkpoint.META_FILE), "w") as f:
        json.dump(data, f)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(ValueError, match=r"--resume .*/nowhere: no such directory"):
        checkpoint.find_checkpoint(str(tmp_path / "nowhere"))
    (tmp_path / "save" / "step_00000002").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"no checkpoint there .* it holds \['step_00000002'\] but none is complete"):
        checkpoint.find_checkpoint(str(tmp_path / "save"))
    (tmp_path / "save" / "latest").write_text("step_00000002")
    with pytest.raises(ValueError, match=r"names .*step_00000002, which is incomplete \(no trainer.json\)"):
        checkpoint.find_checkpoint(str(tmp_path / "save"))
    _save(tmp_path / "save" / "step_00000002", step=2)
    ckpt = checkpoint.find_checkpoint(str(tmp_path / "save"))
    assert ckpt.step == 2 and ckpt.path.endswith("step_00000002")

    settings = {"run": dict(ckpt.meta["run"]), "model_config": {"hidden_size": 64}}
    checkpoint.check_compatible(ckpt, settings, "torch")
    with pytest.raises(ValueError, match=r"saved with --seed 1, this run has 2; resume with the same value"):
        checkpoint.check_compatible(ckpt, {**settings, "run": {**settings["run"], "seed": 2}}, "torch")
    with pytest.raises(ValueError, match=r"the model differs from the saved one \(hidden_size: 64 -> 32\)"):
        checkpoint.check_compatible(ckpt, {**settings, "model_config": {"hidden_size": 32}}, "torch")
    with pytest.raises(
        ValueError,
        match=r"written by the torch engine, this run uses the deepspeed engine; resume "
        r"without --deepspeed",
    ):
        checkpoint.check_compatible(ckpt, settings, "deepspeed")


def test_deepspeed_checkpoint_at_another_world_size(tmp_path):
    path = tmp_path / "step_00000003"
    _save(path, engine="deepspeed", zero_stage=3, world_size=2)
    (path / "deepspeed" / "state").mkdir(parents=True)
    (path / "deepspeed" / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_text("")
    ckpt = checkpoint.find_checkpoint(str(path))
    assert checkpoint.deepspeed_tag(ckpt, 2, 3) == "state"
    with pytest.raises(
        ValueError,
        match=r"saved at world size 2 \(sp=2 x dp=1\) with ZeRO stage 3; this run has "
        r"world size 1 and stage 3.*\n  python -m deepspeed.checkpoint.ds_to_universal "
        r"--input_folder .*/deepspeed/state --output_folder .*/deepspeed/universal",
    ):
        checkpoint.deepspeed_tag(ckpt, 1, 3)
    (path / "deepspeed" / "universal").mkdir()
    assert checkpoint.deepspeed_tag(ckpt, 1, 3) == "universal"
    stage0 = tmp_path / "stage0"
    _save(stage0, engine="deepspeed", zero_stage=0, world_size=2)
    (stage0 / "deepspeed" / "state").mkdir(parents=True)  # fp32 stage 0: no ZeRO shards, replicated optimizer
    assert checkpoint.deepspeed_tag(checkpoint.find_checkpoint(str(stage0)), 4, 0) == "state"


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


def test_failure_reports():
    gloo_closed = RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:5. This is typically caused")
    assert failures.is_collective_error(gloo_closed)
    assert failures.is_collective_error(RuntimeError("[unbound_buffer.cc:78] Timed out waiting 5000ms for recv"))
    assert not failures.is_collective_error(ValueError("bad input"))
    bad = ValueError("bad")
    assert failures.report_failure(bad, "step 3") is bad  # no process group: returned as is
    origin = failures._explain(0, "step 4", gloo_closed, {1: ("origin", "step 4", "OSError: disk full")}, 3, True)
    assert "The job stopped because rank 1 failed at step 4: OSError: disk full" in origin
    silent = failures._explain(0, "step 4", gloo_closed, {2: ("collective", "step 4", "RuntimeError: x")}, 3, True)
    assert "rank(s) [1] stayed silent" in silent and "Ranks [2] saw a failed collective too" in silent
    unreachable = failures._explain(1, "setup", gloo_closed, {}, 2, False)
    assert "store could not be reached" in unreachable
