"""Opt-in performance levers, named in a configuration spec like ``ours+cudnn+sac``.

None of them changes what is computed (same loss, same gradients up to kernel rounding):

* ``cudnn`` (either side): SDPA backend priority cuDNN > flash > efficient > math for the whole
  step (forward, backward and the recomputation), via ``torch.nn.attention.sdpa_kernel(...,
  set_priority=True)``. Only matters with ``--attn sdpa``; a backend that cannot take the inputs is
  skipped by torch as usual, so this only reorders.
* ``sac`` (ours): selective activation checkpointing (``ulysses_sp.memory.activation_checkpointing``, policy
  "selective"). The decoder layers stay checkpointed, but the outputs of the attention kernel and
  of the all-to-alls are saved instead of recomputed in the backward: no second attention forward
  and no second round of all-to-alls per layer, for about 2 (3d + 2 d_kv) bytes more activation
  memory per local token and layer (q, k, v after the all-to-all, the attention output before and
  after it; 28 KiB for the Llama-8B shape against the 8 KiB checkpoint). It applies to kernels that
  reach the dispatcher as ops (SDPA's aten ops, flash-attn >= 2.7's ``flash_attn::_flash_attn_forward``);
  another kernel is simply recomputed as before.
* ``tiled_mlp`` (ours): ``ulysses_sp.tile_mlp`` (tiles of d tokens, the tile count agreed once per
  step); ``offload`` (ours): the layers' checkpoints in pinned host memory
  (``enable_checkpointing(..., offload=True)``); ``norms`` (ours): ``enable_rms_norm_recompute``, the
  RMSNorms save their bf16 input and rstd instead of an fp32 copy and the normalised tensor. They
  save memory, not time.
* ``noac`` (ours, hf): no checkpointing at all (``sac`` and ``noac`` also apply to the hf side,
  through transformers' own ``gradient_checkpointing_enable``).
* ``compile`` (ours): ``ulysses_sp.compile_layers`` (Inductor), after every other feature.
* ``ligerops`` (ours): ``ulysses_sp.fuse_elementwise``, liger-kernel's RMSNorm, SiLU * mul and RoPE on
  this model's modules (before the other memory features; with ``compile`` only outside the
  compiled layers, where Inductor fuses the same work itself).
* ``heads2`` / ``heads4`` (ours): head-chunked attention, the heads of a rank in 2 / 4 chunks
  (``ulysses_sp.apply(..., head_chunks=...)``): memory, not time.
* ``liger`` / ``tiled`` (ours): force the fused liger cross-entropy / the tiled torch one at every
  size (default: the loss's choice by size, docs/loss.md: full logits when they fit 4 GiB, else
  liger when it can run, else tiles; at ZeRO-3 the head is gathered for the loss). ``liger`` (hf):
  liger's fused linear cross-entropy in place of transformers' loss, see hf.py.
* ``tiled_mlp``, ``ac_offload`` (ALST): its TiledMLP and its checkpoint-offload context, see alst.py.
"""

from __future__ import annotations

import contextlib

import torch

OURS = (
    "cudnn",
    "sac",
    "noac",
    "compile",
    "liger",
    "ligerops",
    "tiled",
    "tiled_mlp",
    "offload",
    "norms",
    "heads2",
    "heads4",
)
ALST = ("cudnn", "tiled_mlp", "ac_offload")
HF = ("cudnn", "sac", "noac", "liger")


def sdpa_priority():
    """Context: SDPA tries cuDNN first (then flash, efficient, math)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


def step_context(levers: frozenset[str]):
    """Context manager the side enters around forward + backward."""
    return sdpa_priority() if "cudnn" in levers else contextlib.nullcontext()


def checkpoint_policy(levers: frozenset[str]) -> str:
    """``ulysses_sp.memory.activation_checkpointing`` policy of a lever set: every decoder layer is
    checkpointed ("full") unless ``sac`` (selective) or ``noac`` (none) says otherwise."""
    if "noac" in levers:
        return "none"
    return "selective" if "sac" in levers else "full"


def parse(spec: str) -> tuple[str, frozenset[str]]:
    """``"ours+cudnn+sac"`` -> ("ours", {"cudnn", "sac"}); ValueError on an unknown side or lever."""
    side, *levers = [p.strip() for p in spec.split("+")]
    allowed = {"ours": OURS, "alst": ALST, "hf": HF}.get(side)
    if allowed is None:
        raise ValueError(f"configuration {spec!r}: the side must be 'ours', 'alst' or 'hf'")
    unknown = [lv for lv in levers if lv not in allowed]
    if unknown:
        raise ValueError(f"configuration {spec!r}: unknown lever(s) {unknown} for {side}; allowed: {list(allowed)}")
    for pair in (("liger", "tiled"), ("sac", "noac"), ("heads2", "heads4")):
        if set(pair) <= set(levers):
            raise ValueError(f"configuration {spec!r}: {pair[0]!r} and {pair[1]!r} exclude each other")
    if "offload" in levers and "noac" in levers:
        raise ValueError(f"configuration {spec!r}: 'offload' moves checkpoints, and 'noac' makes none")
    return side, frozenset(levers)


def available_or_reason(levers: frozenset[str], device: str, attn: str) -> str | None:
    """Why this lever set cannot run (or would change nothing) here; None: it can."""
    for lever in sorted({"liger", "ligerops"} & levers):
        if device != "cuda":
            return f"'{lever}' needs CUDA"
        import importlib.util

        if importlib.util.find_spec("liger_kernel") is None:
            return f"'{lever}' needs liger-kernel installed"
    if "cudnn" in levers:
        import inspect

        if attn != "sdpa":
            return f"'cudnn' reorders SDPA backends and changes nothing with --attn {attn}; use --attn sdpa"
        from torch.nn.attention import sdpa_kernel

        if "set_priority" not in inspect.signature(sdpa_kernel).parameters:
            return f"'cudnn' needs sdpa_kernel(set_priority=...) (torch {torch.__version__} lacks it)"
    return None
