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
tok_per_s (all ranks), tok_per_s_per_gpu, peak_mem_gb, lr, grad_norm, step_time_s; with
--eval-every, lines with step, eval_loss, eval_ppl, eval_tokens, eval_batches, eval_time_s.

Checkpoints: --save-dir DIR --save-every N, then --resume DIR (docs/checkpointing.md).
Errors and what to do about them: docs/troubleshooting.md.
"""

_TYPES = {"int": int, "float": float, "str": str}


def build_parser() -> argparse.ArgumentParser:
    """One option per :class:`TrainConfig` field; booleans are switches."""
    parser = argparse.ArgumentParser(
        prog="launch/train.py", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for f in fields(TrainConfig):
        kwargs = dict(f.metadata["argparse"], help=f.metadata["help"], default=f.default)
        assert f.default is not MISSING, f.name
        if f.type == "bool":
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = _TYPES[f.type.split(" | ")[0]]
        parser.add_argument(flag(f.name), **kwargs)
    # set by the deepspeed launcher (and older torch.distributed.launch); the environment's LOCAL_RANK is read instead
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """The :class:`TrainConfig` of a command line (``None``: ``sys.argv``); ValueError for bad values."""
    return TrainConfig.from_mapping(vars(build_parser().parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    from .run import run

    run(parse_config(argv))
