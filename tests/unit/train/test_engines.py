"""The engines' settings that need no process group: the DeepSpeed config a run hands to DeepSpeed."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.helpers import ROOT
from ulysses_sp.train.config import TrainConfig
from ulysses_sp.train.engines import warmup_cosine
from ulysses_sp.train.engines.deepspeed_engine import run_config


def test_deepspeed_config_from_the_flags_names_what_it_replaces():
    shipped = json.loads((Path(ROOT) / "configs" / "deepspeed" / "zero3.json").read_text())
    config = TrainConfig(lr=1e-3, batch_size=2, max_grad_norm=shipped["gradient_clipping"])
    ds, overrides = run_config(shipped, config, torch.float32, "cpu")
    assert ds["optimizer"]["params"]["lr"] == 1e-3 and ds["bf16"]["enabled"] is False
    assert ds["optimizer"]["params"]["torch_adam"] is True  # the detected CPU: no JIT build of the fused Adam
    assert "train_batch_size" not in ds and shipped["bf16"]["enabled"] is True  # the JSON itself is untouched
    assert any(o.startswith("optimizer.params.lr ") and o.endswith("(--lr)") for o in overrides), overrides
    assert any(o.startswith("bf16.enabled True -> False") for o in overrides), overrides
    assert not any("gradient_clipping" in o for o in overrides), overrides  # the same value is no override
    gpu, _ = run_config(shipped, config, torch.bfloat16, "cuda")
    assert "torch_adam" not in gpu["optimizer"]["params"] and gpu["bf16"]["enabled"] is True


def test_warmup_then_cosine_to_a_tenth():
    factor = warmup_cosine(2, 10)
    assert [factor(s) for s in (0, 1)] == [0.5, 1.0]
    assert factor(2) == 1.0 and abs(factor(10) - 0.1) < 1e-12
