"""Checks of the trainer's settings that need no process group, run before distributed init.

Every rank gets the same command line, so a bad value raises the same ValueError on every rank
before any of them joins a collective: no rank is left waiting for one that stopped. Each message
names the value and the fix (docs/troubleshooting.md lists them all).
"""

from __future__ import annotations

import warnings

import torch

#: flags that must be integers >= 1
_POSITIVE = ("steps", "batch_size", "grad_accum", "seq_len")
#: flags that must be integers >= 0 (0 = off, except for the seed)
_NON_NEGATIVE = ("seed", "warmup_steps", "save_every", "eval_every")


def check_args(args) -> None:
    """ValueError for trainer flags no run can use (counts < 1, a timeout <= 0, flags missing their partner)."""
    for name in _POSITIVE:
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{_flag(name)} must be an integer >= 1, got {value!r}")
    for name in _NON_NEGATIVE:
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            off = "" if name == "seed" else " (0 turns it off)"
            raise ValueError(f"--{_flag(name)} must be an integer >= 0{off}, got {value!r}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if args.weight_decay < 0 or args.max_grad_norm < 0:
        raise ValueError(f"--weight-decay and --max-grad-norm must be >= 0 (--max-grad-norm 0 turns clipping off), "
                         f"got {args.weight_decay} and {args.max_grad_norm}")
    if not args.timeout_s > 0:
        raise ValueError(f"--timeout-s must be > 0 seconds (a collective waiting longer fails the job), "
                         f"got {args.timeout_s}")
    if args.save_every and not args.save_dir:
        raise ValueError(f"--save-every {args.save_every} needs --save-dir DIR to write the checkpoints to")
    if args.eval_batches is not None and (isinstance(args.eval_batches, bool) or args.eval_batches < 1):
        raise ValueError(f"--eval-batches must be an integer >= 1 (leave it out to evaluate the whole held-out "
                         f"split), got {args.eval_batches!r}")
    if args.eval_batches is not None and not args.eval_every:
        raise ValueError(f"--eval-batches {args.eval_batches} has no effect without --eval-every N")
    if args.eval_every and not 0 < args.eval_fraction < 1:
        raise ValueError(f"--eval-fraction must be in (0, 1): the share of documents held out for evaluation, "
                         f"got {args.eval_fraction}")


def check_device_dtype(device_type: str, dtype: torch.dtype) -> None:
    """ValueError for a device that is not there or a dtype the device cannot train in."""
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but no CUDA device is visible (torch.cuda.is_available() is "
                         "False); use --device cpu, or check CUDA_VISIBLE_DEVICES and the torch build")
    if device_type == "cpu" and dtype == torch.float16:
        raise ValueError("--dtype fp16 is not supported on CPU (DeepSpeed's CPU accelerator has no fp16 and "
                         "torch's CPU fp16 kernels are partial); use --dtype fp32 or bf16")
    if device_type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name()
        raise ValueError(f"--dtype bf16 needs a GPU with bfloat16 support (compute capability >= 8.0); "
                         f"{name} has none: use --dtype fp16 (DeepSpeed loss scaling) or fp32")


def check_seq_len(config, seq_len: int, allow_longer: bool) -> None:
    """Refuse ``seq_len`` beyond the model's ``max_position_embeddings`` unless ``allow_longer``.

    A rotary (RoPE) model computes positions past its limit, but it was trained (and its
    ``rope_scaling`` chosen) for that limit: a longer ``--seq-len`` is either a typo or a context
    extension, which should be asked for (``allow_longer`` then warns). A model with learned absolute
    position embeddings has no row for such positions and is refused either way: the embedding
    lookup would fail on the ranks holding the late shards only, leaving the others waiting.
    """
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0 or seq_len <= limit:
        return
    rotary = getattr(config, "rope_parameters", None) is not None or getattr(config, "rope_theta", None) is not None
    if not rotary:
        raise ValueError(f"--seq-len {seq_len} exceeds max_position_embeddings={limit} of {type(config).__name__}, "
                         f"which has learned absolute position embeddings (no rows past {limit}); use --seq-len <= "
                         f"{limit}")
    if not allow_longer:
        raise ValueError(f"--seq-len {seq_len} exceeds max_position_embeddings={limit} of {type(config).__name__}; "
                         f"use --seq-len <= {limit}, or pass --allow-longer-than-max-positions to train past it "
                         f"(RoPE extrapolates; consider rope_scaling in the model's config.json)")
    warnings.warn(f"--seq-len {seq_len} exceeds max_position_embeddings={limit}: RoPE positions past the "
                  f"model's trained range (--allow-longer-than-max-positions)", stacklevel=2)


def _flag(name: str) -> str:
    return name.replace("_", "-")
