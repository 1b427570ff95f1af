"""Run checkpoints: finding one, refusing an incompatible run, the DeepSpeed checkpoint at another world size."""

from __future__ import annotations

import json
import os

import pytest

from ulysses_sp.train import checkpoints


def _save(path, step=3, **meta):
    os.makedirs(path, exist_ok=True)
    data = {
        "format": checkpoints.FORMAT,
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
    with open(os.path.join(path, checkpoints.META_FILE), "w") as f:
        json.dump(data, f)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(ValueError, match=r"--resume .*/nowhere: no such directory"):
        checkpoints.find_checkpoint(str(tmp_path / "nowhere"))
    (tmp_path / "save" / "step_00000002").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"no checkpoint there .* it holds \['step_00000002'\] but none is complete"):
        checkpoints.find_checkpoint(str(tmp_path / "save"))
    (tmp_path / "save" / "latest").write_text("step_00000002")
    with pytest.raises(ValueError, match=r"names .*step_00000002, which is incomplete \(no trainer.json\)"):
        checkpoints.find_checkpoint(str(tmp_path / "save"))
    _save(tmp_path / "save" / "step_00000002", step=2)
    ckpt = checkpoints.find_checkpoint(str(tmp_path / "save"))
    assert ckpt.step == 2 and ckpt.path.endswith("step_00000002")

    settings = {"run": dict(ckpt.meta["run"]), "model_config": {"hidden_size": 64}}
    checkpoints.check_compatible(ckpt, settings, "torch")
    with pytest.raises(ValueError, match=r"saved with --seed 1, this run has 2; resume with the same value"):
        checkpoints.check_compatible(ckpt, {**settings, "run": {**settings["run"], "seed": 2}}, "torch")
    with pytest.raises(ValueError, match=r"the model differs from the saved one \(hidden_size: 64 -> 32\)"):
        checkpoints.check_compatible(ckpt, {**settings, "model_config": {"hidden_size": 32}}, "torch")
    with pytest.raises(
        ValueError,
        match=r"written by the torch engine, this run uses the deepspeed engine; resume "
        r"without --deepspeed",
    ):
        checkpoints.check_compatible(ckpt, settings, "deepspeed")


def test_deepspeed_checkpoint_at_another_world_size(tmp_path):
    path = tmp_path / "step_00000003"
    _save(path, engine="deepspeed", zero_stage=3, world_size=2)
    (path / "deepspeed" / "state").mkdir(parents=True)
    (path / "deepspeed" / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_text("")
    ckpt = checkpoints.find_checkpoint(str(path))
    assert checkpoints.deepspeed_tag(ckpt, 2, 3) == "state"
    with pytest.raises(
        ValueError,
        match=r"saved at world size 2 \(sp=2 x dp=1\) with ZeRO stage 3; this run has "
        r"world size 1 and stage 3.*\n  python -m deepspeed.checkpoint.ds_to_universal "
        r"--input_folder .*/deepspeed/state --output_folder .*/deepspeed/universal",
    ):
        checkpoints.deepspeed_tag(ckpt, 1, 3)
    (path / "deepspeed" / "universal").mkdir()
    assert checkpoints.deepspeed_tag(ckpt, 1, 3) == "universal"
    stage0 = tmp_path / "stage0"
    _save(stage0, engine="deepspeed", zero_stage=0, world_size=2)
    (stage0 / "deepspeed" / "state").mkdir(parents=True)  # fp32 stage 0: no ZeRO shards, replicated optimizer
    assert checkpoints.deepspeed_tag(checkpoints.find_checkpoint(str(stage0)), 4, 0) == "state"
