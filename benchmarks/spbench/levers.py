"""Opt-in performance levers, named in a configuration spec like ``ours+cudnn+sac``.

None of them changes what is computed (same loss, same gradients up to kernel rounding):

* ``cudnn`` (either side): SDPA backend priority cuDNN > flash > efficient > math for the whole
  step (forward, backward and the recomputation), via ``torch.nn.attention.sdpa_kernel(...,
  set_priority=True)``. Only matters with ``--attn sdpa``; a backend that cannot take the inputs is
  skipped by torch as usual, so this only reorders.
* ``sac`` (ours): selective activation checkpointing. The decoder layers stay checkpointed, but the
  outputs of the attention kernel and of the all-to-alls are saved instead of recomputed in the
  backward: no second attention forward and no second round of all-to-alls per layer, for about
  2 (3d + 2 d_kv) bytes more activation memory per local token and layer (q, k, v after the
  all-to-all, the attention output before and after it; 28 KiB for the Llama-8B shape against the
  8 KiB checkpoint; the peak-memory column shows the real cost). It applies to kernels that reach
  the dispatcher as ops (SDPA's aten ops, flash-attn >= 2.7's ``flash_attn::_flash_attn_forward``);
  another kernel is simply recomputed as before.
* ``liger`` / ``tiled`` (ours): force the fused liger cross-entropy / the tiled torch one (default:
  liger when it can run). liger cannot run on a ZeRO-3-partitioned head (ulysses_sp refuses it).
* ``tiled_mlp``, ``ac_offload`` (ALST): its TiledMLP and its checkpoint-offload context, see alst.py.
"""

from __future__ import annotations

import contextlib
import functools

import torch

OURS = ("cudnn", "sac", "liger", "tiled")
ALST = ("cudnn", "tiled_mlp", "ac_offload")


def sdpa_priority():
    """Context: SDPA tries cuDNN first (then flash, efficient, math)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


def step_context(levers: frozenset[str]):
    """Context manager the side enters around forward + backward."""
    return sdpa_priority() if "cudnn" in levers else contextlib.nullcontext()


def _save_attention_and_a2a(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    name = str(op)
    if "backward" not in name and ("scaled_dot_product" in name or "_flash_attn_forward" in name
                                   or "all_to_all_single" in name):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_kwargs(levers: frozenset[str]) -> dict:
    """``gradient_checkpointing_kwargs`` for transformers' ``gradient_checkpointing_enable``."""
    kwargs = {"use_reentrant": False}
    if "sac" in levers:
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _save_attention_and_a2a)
    return kwargs


def parse(spec: str) -> tuple[str, frozenset[str]]:
    """``"ours+cudnn+sac"`` -> ("ours", {"cudnn", "sac"}); ValueError on an unknown side or lever."""
    side, *levers = [p.strip() for p in spec.split("+")]
    allowed = {"ours": OURS, "alst": ALST}.get(side)
    if allowed is None:
        raise ValueError(f"configuration {spec!r}: the side must be 'ours' or 'alst'")
    unknown = [lv for lv in levers if lv not in allowed]
    if unknown:
        raise ValueError(f"configuration {spec!r}: unknown lever(s) {unknown} for {side}; allowed: {list(allowed)}")
    if {"liger", "tiled"} <= set(levers):
        raise ValueError(f"configuration {spec!r}: 'liger' and 'tiled' exclude each other")
    return side, frozenset(levers)


def available_or_reason(levers: frozenset[str], device: str, zero_stage: int, attn: str) -> str | None:
    """Why this lever set cannot run (or would change nothing) here; None: it can."""
    if "liger" in levers:
        if device != "cuda":
            return "'liger' needs CUDA"
        if zero_stage == 3:
            return "'liger' cannot run with ZeRO-3 (ulysses_sp refuses a partitioned head)"
        import importlib.util

        if importlib.util.find_spec("liger_kernel") is None:
            return "'liger' needs liger-kernel installed"
    if "cudnn" in levers:
        import inspect

        if attn != "sdpa":
            return f"'cudnn' reorders SDPA backends and changes nothing with --attn {attn}; use --attn sdpa"
        from torch.nn.attention import sdpa_kernel

        if "set_priority" not in inspect.signature(sdpa_kernel).parameters:
            return f"'cudnn' needs sdpa_kernel(set_priority=...) (torch {torch.__version__} lacks it)"
    return None
