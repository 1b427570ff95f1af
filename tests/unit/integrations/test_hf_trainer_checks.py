"""SPTrainer refuses what it cannot do under SP, before any process group is needed, and an
explicit sp_size or ring_size that disagrees with the Accelerate config."""

from __future__ import annotations

import pytest
from transformers import TrainingArguments

from tests.helpers import tiny_model
from ulysses_sp.integrations.accelerate_env import ENV_RING_SIZE, ENV_SP_SIZE
from ulysses_sp.integrations.hf_trainer import SPTrainer


def _args(tmp_path, **kwargs):
    return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **kwargs)


def test_refusals_name_every_problem(tmp_path):
    expected = r"compute_metrics .*logits are never materialised.*label_smoothing_factor=0.1"
    with pytest.raises(ValueError, match=expected):
        SPTrainer(
            model=tiny_model("tiny-llama"),
            args=_args(tmp_path, label_smoothing_factor=0.1),
            compute_metrics=lambda prediction: {},
        )
    with pytest.raises(ValueError, match="batch_rebalance"):
        SPTrainer(model=tiny_model("tiny-llama"), args=_args(tmp_path, train_sampling_strategy="batch_rebalance"))


def test_sp_size_must_agree_with_the_accelerate_config(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_SP_SIZE, "2")
    with pytest.raises(ValueError, match=r"SPTrainer\(sp_size=4\) disagrees with the Accelerate config's SP size 2"):
        SPTrainer(model=tiny_model("tiny-llama"), args=_args(tmp_path), sp_size=4)


def test_ring_size_must_agree_with_the_accelerate_config_and_divide_sp(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_SP_SIZE, "4")
    monkeypatch.setenv(ENV_RING_SIZE, "auto")  # 2 heads at sp 4: a ring of 2
    two_heads = tiny_model("tiny-qwen3", num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    with pytest.raises(
        ValueError, match=r"SPTrainer\(ring_size=4\) disagrees with the Accelerate config's ring size auto \(= 2\)"
    ):
        SPTrainer(model=two_heads, args=_args(tmp_path), ring_size=4)
    monkeypatch.setenv(ENV_RING_SIZE, "")
    with pytest.raises(ValueError, match=r"SPTrainer\(ring_size=3\) does not divide the SP size 4"):
        SPTrainer(model=two_heads, args=_args(tmp_path), ring_size=3)


def test_sp_size_of_the_trainers_deepspeed_json_is_read_and_taken_out(tmp_path):
    ds = {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 0}, "sequence_parallel_size": 2}
    args = _args(tmp_path, deepspeed=ds)
    with pytest.raises(
        ValueError, match=r'SPTrainer\(sp_size=4\) disagrees with "sequence_parallel_size": 2 in the DeepSpeed config'
    ):
        SPTrainer(model=tiny_model("tiny-llama"), args=args, sp_size=4)
    assert "sequence_parallel_size" not in args.hf_deepspeed_config.config  # DeepSpeed's engine never sees it


@pytest.mark.parametrize(
    "env, match",
    [
        ({"FSDP_VERSION": "1"}, r"FSDP version 1 \(the Accelerate config \(ACCELERATE_USE_FSDP\)\).*fsdp_version: 2"),
        ({"FSDP_OFFLOAD_PARAMS": "true"}, "FSDP parameter offload"),
        ({"FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}, "fsdp_cpu_ram_efficient_loading"),
        ({"FSDP_ACTIVATION_CHECKPOINTING": "true"}, "FSDP activation checkpointing.*gradient_checkpointing=True"),
    ],
)
def test_fsdp_settings_it_cannot_honour_are_refused(tmp_path, monkeypatch, env, match):
    """What `accelerate launch` sets from an FSDP config, refused before any process group."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=match):
        SPTrainer(model=tiny_model("tiny-llama"), args=_args(tmp_path))


def test_fsdp2_request_is_read_from_the_environment_and_the_arguments(tmp_path, monkeypatch):
    from ulysses_sp.integrations.trainer_engine import fsdp_request

    class Stub:  # what fsdp_request reads of a Trainer
        is_fsdp_enabled = False
        args = _args(tmp_path)

    assert fsdp_request(Stub()) is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    request = fsdp_request(Stub())
    assert (request.version, request.reshard_after_forward) == (2, False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    Stub.args = _args(tmp_path, fsdp="full_shard", fsdp_config={"version": 2, "reshard_after_forward": True})
    request = fsdp_request(Stub())
    assert (request.version, request.reshard_after_forward, request.source) == (2, True, "TrainingArguments.fsdp")
