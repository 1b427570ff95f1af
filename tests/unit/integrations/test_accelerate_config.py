"""The SP and ring sizes from an Accelerate config: the environment ``accelerate launch`` builds from
our YAMLs (through Accelerate's own launcher code, no processes started), strict parsing, claiming
(Accelerate's ParallelismConfig rejects our backend before and sees no SP after), and the
resolution order of every entry point (explicit, DeepSpeed JSON, Accelerate config) with its errors."""

from __future__ import annotations

import os

import pytest

from tests.helpers import ROOT
from ulysses_sp.integrations.accelerate_env import (
    ENV_RING_SIZE,
    ENV_SP_SIZE,
    claim_sp_size,
    env_flag,
    launched_deepspeed_config_file,
    launched_engine,
    read_ring_size,
    read_sp_size,
)
from ulysses_sp.integrations.sp_size import parse_ring_size, resolve_ring_size, resolve_sp_size
from ulysses_sp.train.presets import build_config

OURS = {
    "ACCELERATE_USE_PARALLELISM_CONFIG": "true",
    "PARALLELISM_CONFIG_SP_SIZE": "2",
    "PARALLELISM_CONFIG_SP_BACKEND": "ulysses_sp",
    "PARALLELISM_CONFIG_DP_SHARD_SIZE": "1",
}


def launcher_env(config: str, *cli: str) -> tuple[int, dict]:
    """Process count and environment ``accelerate launch --config_file config *cli script`` gives."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", os.path.join(ROOT, config), *cli, "train.py"])
    args, _, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ""
        return args.num_processes, prepare_deepspeed_cmd_env(args)[1]
    return args.num_processes, prepare_multi_gpu_env(args)


@pytest.mark.parametrize(
    "config, cli, processes, sp, ring",
    [
        ("configs/accelerate/sp2.yaml", (), 2, 2, None),
        ("configs/accelerate/sp2.yaml", ("--num_processes", "4"), 4, 2, None),
        ("configs/accelerate/sp2.yaml", ("--num_processes", "4", "--parallelism_config_sp_size", "4"), 4, 4, None),
        # hybrid SP: cp_size is the ring; Ulysses sp_size x ring cp_size ranks share a sequence
        ("configs/accelerate/sp2.yaml", ("--num_processes", "4", "--parallelism_config_cp_size", "2"), 4, 4, 2),
        ("configs/accelerate/multi_gpu_sp4.yaml", (), 8, 4, None),
        ("configs/accelerate/deepspeed_zero2_sp2.yaml", (), 2, 2, None),
        ("configs/accelerate/fsdp2_sp2.yaml", (), 2, 2, None),
    ],
)
def test_shipped_yamls_give_our_sp_size(config, cli, processes, sp, ring):
    num_processes, env = launcher_env(config, *cli)
    assert (num_processes, read_sp_size(env), read_ring_size(env)) == (processes, sp, ring)
    assert env["PARALLELISM_CONFIG_SP_BACKEND"] == "ulysses_sp"
    expected_ds = "configs/deepspeed/zero2.json" if "deepspeed" in config else None
    assert launched_deepspeed_config_file(env) == expected_ds
    assert launched_engine(env) == ("deepspeed" if expected_ds else "fsdp" if "fsdp" in config else None)


def test_cli_false_arrives_as_true_and_is_ignored():
    """Accelerate parses --parallelism_config_sp_seq_length_is_variable with type=bool; ulysses_sp
    reads neither that key nor sp_seq_length, so the corrupted value changes nothing here."""
    _, env = launcher_env("configs/accelerate/sp2.yaml", "--parallelism_config_sp_seq_length_is_variable", "False")
    assert env["PARALLELISM_CONFIG_SP_SEQ_LENGTH_IS_VARIABLE"] == "True"  # the launcher's bug
    assert read_sp_size(env) == 2


def test_env_flag_is_strict():
    assert env_flag("X", {"X": "False"}) is False and env_flag("X", {"X": " TRUE "}) is True
    assert env_flag("X", {"X": "0"}) is False and env_flag("X", {}) is False
    with pytest.raises(ValueError, match="X='Flase' is not a boolean"):
        env_flag("X", {"X": "Flase"})


def test_read_sp_size_sources_and_errors():
    assert read_sp_size({}) is None
    assert read_sp_size(dict(OURS)) == 2
    assert read_sp_size({ENV_SP_SIZE: "4"}) == 4
    assert read_sp_size({**OURS, ENV_SP_SIZE: "2"}) == 2
    with pytest.raises(ValueError, match="ULYSSES_SP_SIZE=4 disagrees with the Accelerate config.s SP size 2"):
        read_sp_size({**OURS, ENV_SP_SIZE: "4"})
    alst = {**OURS, "PARALLELISM_CONFIG_SP_BACKEND": "deepspeed"}
    with pytest.raises(ValueError, match="DeepSpeed's ALST.*parallelism_config_sp_backend: ulysses_sp"):
        read_sp_size(alst)
    assert read_sp_size({**alst, "PARALLELISM_CONFIG_SP_SIZE": "1"}) is None  # deepspeed backend, no SP: not ours
    with pytest.raises(ValueError, match="'ring' is unknown"):
        read_sp_size({**OURS, "PARALLELISM_CONFIG_SP_BACKEND": "ring"})
    with pytest.raises(ValueError, match="parallelism_config_dp_shard_size: 2.*set those sizes to 1"):
        read_sp_size({**OURS, "PARALLELISM_CONFIG_DP_SHARD_SIZE": "2"})
    with pytest.raises(ValueError, match=r"ULYSSES_SP_SIZE=2 disagrees with the Accelerate config's SP size 4 \("):
        read_sp_size({**OURS, "PARALLELISM_CONFIG_CP_SIZE": "2", ENV_SP_SIZE: "2"})
    with pytest.raises(ValueError, match="PARALLELISM_CONFIG_SP_SIZE='two' is not an integer"):
        read_sp_size({**OURS, "PARALLELISM_CONFIG_SP_SIZE": "two"})


def test_claim_hides_sp_from_accelerate(monkeypatch):
    from accelerate import ParallelismConfig

    for key, value in OURS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(ENV_SP_SIZE, "")  # empty = unset; recorded, so the value claim writes is undone
    with pytest.raises(ValueError, match="sp_backend must be one of"):
        ParallelismConfig()  # what Accelerator() would do with the launcher's environment
    monkeypatch.setenv(ENV_RING_SIZE, "")
    monkeypatch.setenv("PARALLELISM_CONFIG_CP_SIZE", "2")  # hybrid: 2 Ulysses ranks x a ring of 2
    assert claim_sp_size() == 4
    assert claim_sp_size() == 4  # idempotent: the sizes now live in ULYSSES_SP_SIZE / ULYSSES_SP_RING_SIZE
    assert read_ring_size() == 2
    assert os.environ[ENV_SP_SIZE] == "4" and not env_flag("ACCELERATE_USE_PARALLELISM_CONFIG")
    assert os.environ[ENV_RING_SIZE] == "2"
    pc = ParallelismConfig()
    assert pc.sp_size == 1 and not pc.sp_enabled and pc.cp_size == 1


def test_claim_without_sp_changes_nothing():
    env = {
        "ACCELERATE_USE_PARALLELISM_CONFIG": "true",
        "PARALLELISM_CONFIG_SP_SIZE": "1",
        "PARALLELISM_CONFIG_SP_BACKEND": "deepspeed",
    }
    before = dict(env)
    assert claim_sp_size(env) is None and env == before


def test_resolve_sp_size_order_and_conflicts():
    assert resolve_sp_size(None, {}, {}) == 1
    assert resolve_sp_size(3, {}, {}) == 3
    assert resolve_sp_size(None, {"sequence_parallel_size": 4}, {}) == 4
    assert resolve_sp_size(None, {}, dict(OURS)) == 2
    assert resolve_sp_size(2, {"sequence_parallel_size": 2}, dict(OURS)) == 2
    with pytest.raises(ValueError, match="--sp-size 4 disagrees with the Accelerate config's SP size 2"):
        resolve_sp_size(4, {}, dict(OURS))
    with pytest.raises(ValueError, match='"sequence_parallel_size": 4 in the DeepSpeed config disagrees'):
        resolve_sp_size(None, {"sequence_parallel_size": 4}, dict(OURS))
    with pytest.raises(ValueError, match=r"SPTrainer\(sp_size=4\) disagrees with the Accelerate config's SP size 2"):
        resolve_sp_size(4, None, dict(OURS), explicit_source="SPTrainer(sp_size=4)")
    with pytest.raises(
        ValueError,
        match=r'"sequence_parallel_size" in the DeepSpeed config must be an integer >= 1, '
        r"got '4'",
    ):
        resolve_sp_size(None, {"sequence_parallel_size": "4"}, {})


def test_read_ring_size_sources_and_errors():
    assert read_ring_size({}) is None and read_ring_size(dict(OURS)) is None
    assert read_ring_size({**OURS, "PARALLELISM_CONFIG_CP_SIZE": "2"}) == 2
    assert read_ring_size({ENV_RING_SIZE: "auto"}) == "auto" and read_ring_size({ENV_RING_SIZE: "3"}) == 3
    # under another backend cp_size is Accelerate's own context parallelism, not a ring of ours
    assert read_ring_size({"PARALLELISM_CONFIG_SP_BACKEND": "deepspeed", "PARALLELISM_CONFIG_CP_SIZE": "2"}) is None
    with pytest.raises(ValueError, match="ULYSSES_SP_RING_SIZE=4 disagrees with parallelism_config_cp_size: 2"):
        read_ring_size({**OURS, "PARALLELISM_CONFIG_CP_SIZE": "2", ENV_RING_SIZE: "4"})
    with pytest.raises(ValueError, match="ULYSSES_SP_RING_SIZE='two' is not an integer"):
        read_ring_size({ENV_RING_SIZE: "two"})


def test_resolve_ring_size_order_auto_and_conflicts():
    """Every entry point's rule: explicit, else the DeepSpeed JSON, else the Accelerate config, else 1;
    "auto" from any of them (the smallest ring giving every Ulysses rank a head, Ulysses inside a node);
    sources resolving to different sizes, and a size not dividing the SP size, are errors naming them."""
    heads2 = build_config("tiny-qwen3", num_attention_heads=2, num_key_value_heads=1)
    heads8 = build_config("tiny-llama-gqa")
    assert resolve_ring_size(None, 4, heads2, {}, {}) == 1
    assert resolve_ring_size(2, 4, heads2, {}, {}) == 2
    assert resolve_ring_size(None, 4, heads2, {"sequence_parallel_ring_size": 4}, {}) == 4
    assert resolve_ring_size(None, 4, heads2, {}, {ENV_RING_SIZE: "2"}) == 2
    assert resolve_ring_size("auto", 4, heads2, {}, {}) == 2  # 2 Ulysses ranks of one head each
    assert resolve_ring_size(None, 4, heads2, {"sequence_parallel_ring_size": "auto"}, {}) == 2
    assert resolve_ring_size(None, 32, heads8, {}, {ENV_RING_SIZE: "auto"}) == 4
    assert resolve_ring_size("auto", 32, heads8, {}, {"LOCAL_WORLD_SIZE": "4"}) == 8  # Ulysses inside 4-rank nodes
    assert resolve_ring_size("auto", 2, heads8, {}, {}) == 1
    # "auto" and an integer that agree are one ring size
    assert resolve_ring_size("auto", 4, heads2, {"sequence_parallel_ring_size": 2}, {ENV_RING_SIZE: "2"}) == 2
    with pytest.raises(ValueError, match=r"--ring-size auto \(= 2\) disagrees with .*ring_size\": 4 in the DeepSpeed"):
        resolve_ring_size("auto", 4, heads2, {"sequence_parallel_ring_size": 4}, {})
    with pytest.raises(
        ValueError, match=r"SPTrainer\(ring_size=2\) disagrees with the Accelerate config's ring size 4"
    ):
        resolve_ring_size(
            2, 4, heads2, {}, {**OURS, "PARALLELISM_CONFIG_CP_SIZE": "4"}, explicit_source="SPTrainer(ring_size={})"
        )
    with pytest.raises(ValueError, match=r"--ring-size 3 does not divide the SP size 4.*\[1, 2, 4\] or auto"):
        resolve_ring_size(3, 4, heads2, {}, {})
    with pytest.raises(ValueError, match="--ring-size 0: the ring size must be an integer >= 1 or 'auto', got 0"):
        resolve_ring_size(0, 4, heads2, {}, {})
    with pytest.raises(ValueError, match="the ring size must be an integer >= 1 or 'auto', got '2'"):
        resolve_ring_size(None, 4, heads2, {"sequence_parallel_ring_size": "2"}, {})


def test_parse_ring_size():
    assert (parse_ring_size("auto"), parse_ring_size("4")) == ("auto", 4)
    for bad in ("0", "-2", "two", ""):
        with pytest.raises(ValueError, match="a ring size is an integer >= 1 or auto"):
            parse_ring_size(bad)
