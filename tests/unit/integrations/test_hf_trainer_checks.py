"""SPTrainer refuses what it cannot do under SP, before any process group is needed, and an
explicit sp_size that disagrees with the Accelerate config."""

from __future__ import annotations

import pytest
from transformers import TrainingArguments

from tests.helpers import tiny_model
from ulysses_sp.integrations.accelerate_env import ENV_SP_SIZE
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
