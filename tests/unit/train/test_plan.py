"""What the plan resolves and checks before distributed init: the device and dtype, the sequence
length against the model, an Accelerate launch whose engine the trainer would not use."""

from __future__ import annotations

import pytest
import torch
import transformers

from ulysses_sp.integrations.accelerate_env import launched_deepspeed_config_file
from ulysses_sp.train.plan import check_accelerate_launch, check_device_dtype, check_seq_len
from ulysses_sp.train.presets import build_config

OURS = {
    "ACCELERATE_USE_PARALLELISM_CONFIG": "true",
    "PARALLELISM_CONFIG_SP_SIZE": "2",
    "PARALLELISM_CONFIG_SP_BACKEND": "ulysses_sp",
    "PARALLELISM_CONFIG_DP_SHARD_SIZE": "1",
}


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


def test_accelerate_launches_the_trainer_cannot_honour():
    ds_launch = {**OURS, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "z2.json"}
    assert launched_deepspeed_config_file(ds_launch) == "z2.json"  # the trainer loads it as --deepspeed
    assert launched_deepspeed_config_file(OURS) is None
    check_accelerate_launch({"zero_optimization": {"stage": 2}}, ds_launch)
    inline = {**OURS, "ACCELERATE_USE_DEEPSPEED": "true"}  # DeepSpeed settings in the YAML, no JSON file
    with pytest.raises(
        ValueError,
        match=r"accelerate launched DeepSpeed \(deepspeed_config_file \(set in the "
        r"Accelerate config's deepspeed_config\)\).*add --deepspeed CONFIG.json",
    ):
        check_accelerate_launch({}, inline)
    with pytest.raises(ValueError, match="accelerate launched FSDP, which launch/train.py does not support"):
        check_accelerate_launch({}, {"ACCELERATE_USE_FSDP": "true"})
