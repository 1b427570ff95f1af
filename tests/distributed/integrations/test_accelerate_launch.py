"""``accelerate launch`` end to end on CPU, with the shipped configs/accelerate/sp2.yaml: the SP size
comes from the Accelerate config and the loss curve equals the matching non-SP run within 1e-4
relative (fp32, same seed, same global batch):

* launch/train.py at 2 processes against one process, as hybrid SP from the launcher's
  ``--parallelism_config_sp_size 1 --parallelism_config_cp_size 2`` (a ring of 2: (u, r) = (1, 2));
* launch/train.py at 4 processes (``--num_processes 4``: dp2 x sp2) against torchrun dp2;
* examples/accelerate_loop.py (Accelerator + prepare_sp + train_step) at 2 processes against the
  same script in one process with ``--sp-size 1``;
* configs/accelerate/deepspeed_zero2_sp2.yaml (distributed_type DEEPSPEED, its ZeRO-2 config file
  taken as --deepspeed) against the non-SP DeepSpeed run;
* configs/accelerate/fsdp2_sp2.yaml (distributed_type FSDP) with launch/train.py --fsdp (the FSDP2
  engine) on 4 processes (dp2 x sp2) against the non-SP FSDP2 run over dp2.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.distributed.train.test_train_e2e import COMMON, TRAIN, assert_same_curve, train
from tests.helpers import ROOT, free_port, run_ok

pytestmark = pytest.mark.slow

SP2_YAML = os.path.join(ROOT, "configs", "accelerate", "sp2.yaml")
FSDP2_YAML = os.path.join(ROOT, "configs", "accelerate", "fsdp2_sp2.yaml")
DS_YAML = os.path.join("configs", "accelerate", "deepspeed_zero2_sp2.yaml")  # its JSON path is relative to the root
EXAMPLE = os.path.join(ROOT, "examples", "accelerate_loop.py")


def _losses(metrics) -> list[float]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)) and rows
    return [r["loss"] for r in rows]


def accelerate_launch(
    tmp_path, name, script, *args, num_processes=None, config=SP2_YAML, cwd=None, launcher_args=(), log=""
):
    metrics = tmp_path / f"{name}.jsonl"
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.accelerate_cli",
        "launch",
        "--config_file",
        config,
        "--main_process_port",
        str(free_port()),
    ]
    if num_processes is not None:
        launch += ["--num_processes", str(num_processes)]
    launch += launcher_args
    device = ["--device", "cpu"] if script == TRAIN else []
    out = run_ok([*launch, script, *device, "--metrics", str(metrics), *args], cwd=cwd or tmp_path)
    assert log in out.stderr, out.stderr[-3000:]
    return _losses(metrics)


def _both(sp_run, ref_run):
    """Run the SP job and its reference at once (independent jobs: their start-ups overlap)."""
    with ThreadPoolExecutor(2) as pool:
        sp, ref = pool.submit(sp_run), pool.submit(ref_run)
        return sp.result(), ref.result()


def test_sp2_yaml_as_a_ring_matches_single_process(tmp_path):
    """The ring size travels from the Accelerate config (its cp_size) to launch/train.py."""
    args = [*COMMON, "--seq-len", "64", "--batch-size", "2", "--grad-accum", "2"]
    ring = ["--parallelism_config_sp_size", "1", "--parallelism_config_cp_size", "2"]
    assert_same_curve(
        *_both(
            # the ring really ran (Ulysses alone gives the same curve)
            lambda: accelerate_launch(
                tmp_path, "acc_ring2", TRAIN, *args, launcher_args=ring, log="hybrid SP: 1 Ulysses x 2 ring ranks"
            ),
            lambda: train(tmp_path, "ref", 1, "--sp-size", "1", *args),
        )
    )


def test_four_processes_dp2_sp2_matches_dp2(tmp_path):
    args = [*COMMON, "--seq-len", "48", "--batch-size", "1", "--pack"]
    assert_same_curve(
        *_both(
            lambda: accelerate_launch(tmp_path, "acc_dp2sp2", TRAIN, *args, num_processes=4),
            lambda: train(tmp_path, "dp2", 2, "--sp-size", "1", *args),
        )
    )


def _example_reference(tmp_path, *args):
    metrics = tmp_path / "example_ref.jsonl"
    run_ok([sys.executable, EXAMPLE, "--sp-size", "1", "--metrics", str(metrics), *args], cwd=tmp_path)
    return _losses(metrics)


def test_example_loop_sp2_matches_one_process(tmp_path):
    args = ["--model", "tiny-llama-gqa", "--steps", "5", "--seq-len", "40", "--seed", "3"]
    assert_same_curve(
        *_both(
            lambda: accelerate_launch(tmp_path, "example_sp2", EXAMPLE, *args),
            lambda: _example_reference(tmp_path, *args),
        )
    )


def test_deepspeed_yaml_sp2_matches_non_sp_deepspeed(tmp_path):
    """As its header says, run from the repository root: the YAML names configs/deepspeed/zero2.json."""
    args = [*COMMON, "--seq-len", "40", "--batch-size", "1", "--pack", "--dtype", "fp32"]
    zero0 = os.path.join(ROOT, "configs", "deepspeed", "zero0.json")
    assert_same_curve(
        *_both(
            lambda: accelerate_launch(tmp_path, "acc_ds_sp2", TRAIN, *args, config=DS_YAML, cwd=ROOT),
            lambda: train(tmp_path, "ds_ref", 1, "--sp-size", "1", "--deepspeed", zero0, *args, launcher="deepspeed"),
        )
    )


def test_fsdp2_yaml_dp2_sp2_matches_non_sp_fsdp2(tmp_path):
    """launch/train.py --fsdp under fsdp2_sp2.yaml on 4 processes (dp2 x sp2) with every memory
    feature against torchrun dp2 --fsdp without SP."""
    args = [*COMMON, "--seq-len", "40", "--batch-size", "1", "--pack", "--fsdp"]
    args += ["--grad-ckpt", "selective", "--tiled-mlp", "--recompute-norms"]
    assert_same_curve(
        *_both(
            lambda: accelerate_launch(tmp_path, "acc_fsdp2", TRAIN, *args, num_processes=4, config=FSDP2_YAML),
            lambda: train(tmp_path, "fsdp_dp2", 2, "--sp-size", "1", *args),
        )
    )
