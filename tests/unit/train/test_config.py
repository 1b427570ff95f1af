"""TrainConfig: every flag checked when the config is built, before any process group exists, so every
rank fails alike; the command line is built from the config's fields."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from tests.helpers import ROOT
from ulysses_sp.core import comm
from ulysses_sp.train.cli import build_parser, configuration_markdown, parse_config
from ulysses_sp.train.config import TrainConfig, flag
from ulysses_sp.train.run import run


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--steps", "0"], r"--steps must be an integer >= 1, got 0"),
        (["--batch-size", "0"], r"--batch-size must be an integer >= 1, got 0"),
        (["--grad-accum", "-1"], r"--grad-accum must be an integer >= 1, got -1"),
        (["--seq-len", "1"], r"--seq-len must be an integer >= 2 \(a row needs a next token to learn from\), got 1"),
        (["--warmup-steps", "-2"], r"--warmup-steps must be an integer >= 0 \(0 turns it off\), got -2"),
        (["--seed", "-1"], r"--seed must be an integer >= 0"),
        (["--lr", "0"], r"--lr must be > 0, got 0.0"),
        (["--max-grad-norm", "-1"], r"--weight-decay and --max-grad-norm must be >= 0"),
        (["--timeout-s", "0"], r"--timeout-s must be > 0 seconds .* got 0.0"),
        (["--save-every", "5"], r"--save-every 5 needs --save-dir DIR"),
        (["--eval-every", "2", "--eval-batches", "0"], r"--eval-batches must be an integer >= 1 .* got 0"),
        (["--eval-batches", "3"], r"--eval-batches 3 has no effect without --eval-every N"),
        (["--eval-every", "2", "--eval-fraction", "1.5"], r"--eval-fraction must be in \(0, 1\).* got 1.5"),
        (["--fsdp", "--deepspeed", "z.json"], r"--fsdp and --deepspeed z.json name two engines; keep one"),
        (["--no-reshard-after-forward"], r"--no-reshard-after-forward is an FSDP2 setting: add --fsdp"),
        (["--fsdp", "--dtype", "fp16"], r"--fsdp trains in fp32 or bf16: fp16 needs loss scaling"),
        (["--head-chunks", "0"], r"--head-chunks must be an integer >= 1, got 0"),
        (["--memory", "auto", "--grad-ckpt", "--tiled-mlp"], r"--memory auto chooses --grad-ckpt, --tiled-mlp itself"),
        (["--head-chunks", "2", "--grad-ckpt", "selective"], r"--head-chunks 2 with --grad-ckpt selective"),
    ],
)
def test_flag_values_are_checked(argv, match):
    with pytest.raises(ValueError, match=match):
        parse_config(argv)


def test_bad_flags_fail_before_distributed_init():
    with pytest.raises(ValueError, match="--steps must be"):
        run(parse_config(["--steps", "0", "--device", "cpu"]))
    assert not comm.is_initialized()


def test_memory_flags():
    assert parse_config([]).grad_ckpt == "none"
    assert (parse_config([]).compile, parse_config(["--compile"]).compile) == (None, "inductor")
    assert parse_config(["--compile", "aot_eager", "--head-chunks", "2"]).head_chunks == 2
    assert (parse_config([]).liger_ops, parse_config(["--liger-ops", "--compile"]).liger_ops) == (False, True)
    assert parse_config(["--grad-ckpt"]).grad_ckpt == "full"
    config = parse_config(["--grad-ckpt", "selective", "--tiled-mlp", "--offload-activations", "--recompute-norms"])
    assert (config.grad_ckpt, config.tiled_mlp, config.offload_activations, config.recompute_norms) == (
        "selective",
        True,
        True,
        True,
    )
    with pytest.raises(ValueError, match="--offload-activations moves the layers' checkpoints to host memory"):
        parse_config(["--offload-activations"])


def test_the_command_line_is_the_config():
    """Every TrainConfig field is a flag with its default and help; the parsed config is frozen."""
    parser = build_parser()
    options = {action.dest: action for action in parser._actions}
    for f in fields(TrainConfig):
        assert flag(f.name) in options[f.name].option_strings, f.name
        assert options[f.name].default == f.default and options[f.name].help, f.name
    config = parse_config(["--seq-len", "64", "--pack", "--attn", "eager", "--sp-size", "2"])
    assert (config.seq_len, config.pack, config.attn, config.sp_size) == (64, True, "eager", 2)
    assert config == TrainConfig(seq_len=64, pack=True, attn="eager", sp_size=2)
    with pytest.raises(AttributeError):
        config.seq_len = 128  # validated once, never changed after
    assert parse_config(["--dtype", "bfloat16"]).dtype == "bfloat16"  # torch's names too
    with pytest.raises(
        ValueError,
        match=r"--dtype must be one of \['fp32', 'bf16', 'fp16', 'float32', 'bfloat16', "
        r"'float16'\], got 'float64'",
    ):
        TrainConfig(dtype="float64")


def test_configuration_doc_lists_every_flag_and_preset():
    """docs/configuration.md holds the generated tables: every flag with its default and help, every preset."""
    doc = (Path(ROOT) / "docs" / "configuration.md").read_text()
    assert configuration_markdown() in doc, (
        "docs/configuration.md is out of date; paste the output of\n  python -c 'from ulysses_sp.train.cli import "
        "configuration_markdown as c; print(c())'\nbetween its 'generated' markers"
    )
