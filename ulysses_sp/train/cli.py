"""launch/train.py's command line: argparse built from :class:`TrainConfig`'s fields, and ``main``."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields

from .config import TrainConfig, flag

DESCRIPTION = """Train a causal LM with Ulysses sequence parallelism.

    deepspeed --num_gpus 8 launch/train.py --sp-size 4 --deepspeed configs/deepspeed/zero3.json
    torchrun --nproc_per_node 4 launch/train.py --sp-size 2 --device cpu
    accelerate launch --config_file configs/accelerate/sp2.yaml launch/train.py

DP = world / SP. Every rank of an SP group reads the same samples and keeps S/P tokens of them.
Metrics (JSON lines, --metrics): step, loss (global token mean), tokens (per step, all ranks),
tok_per_s (all ranks), tok_per_s_per_gpu, peak_mem_gb, lr, grad_norm, step_time_s, loss_path; with
--eval-every, lines with step, eval_loss, eval_ppl, eval_tokens, eval_batches, eval_time_s.

Checkpoints: --save-dir DIR --save-every N, then --resume DIR (docs/checkpointing.md).
Errors and what to do about them: docs/troubleshooting.md.
"""

_TYPES = {"int": int, "float": float, "str": str}


def build_parser() -> argparse.ArgumentParser:
    """One option per :class:`TrainConfig` field (booleans are switches); the presets in the epilog."""
    from .presets import PRESETS

    presets = "\n".join(f"  {name:<26} {cls} {_shape(kwargs)}" for name, (cls, kwargs) in PRESETS.items())
    parser = argparse.ArgumentParser(
        prog="launch/train.py",
        description=DESCRIPTION,
        epilog=f"presets for --model (random weights, built from the config):\n{presets}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for f in fields(TrainConfig):
        assert f.default is not MISSING, f.name
        kwargs = dict(f.metadata["argparse"], help=f.metadata["help"], default=f.default)
        if f.type == "bool":
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = _TYPES[f.type.split(" | ")[0]]
        parser.add_argument(flag(f.name), **kwargs)
    # set by the deepspeed launcher (and older torch.distributed.launch); the environment's LOCAL_RANK is read instead
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def _shape(kwargs: dict) -> str:
    heads = f"{kwargs['num_attention_heads']} heads / {kwargs['num_key_value_heads']} kv"
    return f"({kwargs['num_hidden_layers']} layers, d={kwargs['hidden_size']}, {heads})"


def configuration_markdown() -> str:
    """The tables of every flag and every preset in docs/configuration.md, from the same fields and
    presets as the command line (tests/unit/train/test_config.py checks that the doc holds exactly this)."""
    from .presets import PRESETS

    rows = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for action in build_parser()._actions:
        if not action.option_strings or action.help in (None, argparse.SUPPRESS) or action.dest == "help":
            continue
        name = action.option_strings[0] + (f" {action.metavar}" if action.metavar else "")
        f = next(f for f in fields(TrainConfig) if f.name == action.dest)
        shown = f.metadata["shown_default"] or ("off" if action.default is False else f"`{action.default}`")
        choices = f" ({', '.join(map(str, action.choices))})" if action.choices else ""
        rows.append(f"| `{name}` | {shown} | {action.help}{choices} |")
    rows += ["", "| preset (`--model`) | config class | shape |", "| --- | --- | --- |"]
    rows += [f"| `{name}` | {cls} | {_shape(kwargs)[1:-1]} |" for name, (cls, kwargs) in PRESETS.items()]
    return "\n".join(rows)


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """The :class:`TrainConfig` of a command line (``None``: ``sys.argv``); ValueError for bad values."""
    return TrainConfig.from_mapping(vars(build_parser().parse_args(argv)))


#: how long a rank other than 0 waits before reporting its own refusal (see main)
REFUSAL_GRACE_S = 3.0


def main(argv: list[str] | None = None) -> None:
    """launch/train.py: a setting no run can use (a flag, a file, this machine) ends every rank at once
    with exit code 2, before any process group exists and before the heavy imports where it can; rank
    0 says what was wrong and how to fix it, in one block.

    The other ranks report a refusal of their own only after ``REFUSAL_GRACE_S``: when every rank
    refused alike (the usual case: the same flags and files), the launcher (torchrun, deepspeed) has
    stopped them by then, because rank 0 exited; when only this rank refused (a file missing on its
    node), it is still alive and says why, naming its rank, while rank 0 waits for it in vain."""
    import time

    from ..core.log import configure_logging, logger, process_rank

    configure_logging()
    try:
        config = parse_config(argv)
        from .plan import make_plan  # transformers, the model's config and the files: after the flags

        plan = make_plan(config)
    except ValueError as e:
        rank = process_rank()
        if rank != 0:
            time.sleep(REFUSAL_GRACE_S)
        # a warning on other ranks: the handler shows it with the rank (an info would be rank 0's only)
        (logger.error if rank == 0 else logger.warning)("%s\n(every message and its fix: docs/troubleshooting.md)", e)
        raise SystemExit(2) from None
    from .run import run_plan

    run_plan(plan)
