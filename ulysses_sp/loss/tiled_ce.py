"""Summed cross-entropy of ``head(hidden)`` against labels, in token tiles: no [T, V] logits.

Shape legend: T tokens of the local shard (B*s flattened), D hidden size, V vocabulary,
t tokens per tile.

Torch path (the reference, any device): the tokens are cut into tiles of ``t`` and each tile's
``head -> transform -> fp32 -> cross_entropy(sum)`` runs under non-reentrant
``torch.utils.checkpoint``. Autograd keeps only each tile's inputs (a view of ``hidden`` and of the
labels); the backward recomputes one tile's [t, V] logits at a time. So the fp32 logits alive at any
moment are those of one tile (plus its log-softmax / gradient, a small constant factor), in the
forward and in the backward, while the gradient is exact. The cost is one extra ``head`` forward
per tile (about 2*T*D*V FLOPs, ~2% of a step for an 8B model).

Why recompute rather than compute the gradients inside the forward (ALST's TiledFusedLogitsLoss,
liger's kernel): ``head`` stays a module call, so ZeRO-3 / FSDP parameter hooks, PEFT-wrapped or
quantised heads keep working; no [V, D] fp32 weight-gradient buffer is held from forward to
backward; and it is right for any upstream gradient, with nothing to keep in sync by hand.

Liger path (CUDA, ``liger-kernel`` installed, a plain ``nn.Linear`` head): liger's fused linear
cross-entropy, which chunks the tokens itself and computes the gradients in its forward.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..core.checks import check_int
from .logits import LogitTransform

IGNORE_INDEX = -100
#: default budget for the fp32 logits of one tile (tile tokens = budget / (4 * V)).
DEFAULT_TILE_BYTES = 1 << 30
#: fp32 logits of a whole shard up to this size are computed in one piece and kept for the backward,
#: as plain transformers does (its loss upcasts all of them): no recomputation, no fused-kernel
#: overhead, so short batches pay nothing for the long-sequence path. 4 GiB: 8K tokens at V = 128K,
#: where it is still faster than liger's fused kernel on an H200 (docs/performance.md).
DEFAULT_FULL_LOGITS_BYTES = 4 << 30
#: how the loss turns hidden states into the CE sum: one untiled piece, liger's fused kernel, tiles
LOSS_PATHS = ("full", "liger", "tiled")


def fits_full(tokens: int, vocab_size: int, full_logits_bytes: int) -> bool:
    """Whether the fp32 logits [tokens, V] fit the "full" path's budget."""
    return 4 * tokens * vocab_size <= full_logits_bytes


def choose_loss_path(fits: bool, liger_reason: str | None, use_liger: bool | None) -> str:
    """One of :data:`LOSS_PATHS`: "liger" when required (``use_liger`` True; ``liger_reason`` must then
    be None), else "full" when the shard's fp32 logits ``fits`` the budget (:func:`fits_full`), else
    "liger" when it can run (``liger_reason`` None) and is not disabled, else "tiled"."""
    if use_liger:
        if liger_reason is not None:
            raise ValueError(f"use_liger=True but the fused liger loss cannot run: {liger_reason}")
        return "liger"
    if fits:
        return "full"
    return "liger" if use_liger is None and liger_reason is None else "tiled"


def tile_tokens_for_budget(vocab_size: int, budget_bytes: int = DEFAULT_TILE_BYTES) -> int:
    """Tokens per tile so that one tile's fp32 logits [t, V] take at most ``budget_bytes``."""
    return max(1, int(budget_bytes) // (4 * vocab_size))


def _tile_ce_sum(head, transform: LogitTransform, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """h [t, D], y [t] -> scalar fp32 sum of CE over the non-ignored tokens (0 when none)."""
    logits = transform(head(h)).float()  # [t, V]
    return F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")


def tiled_cross_entropy_sum(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head,
    tile_tokens: int,
    transform: LogitTransform = LogitTransform(),
    recompute: bool = True,
) -> torch.Tensor:
    """Sum over tokens of CE(transform(head(hidden[i])), labels[i]); -100 labels are skipped.

    hidden [T, D], labels [T] int64, ``head`` maps [t, D] -> [t, V] (a module, called once per tile
    and once more per tile in the backward). ``recompute=False`` keeps every tile's logits for the
    backward instead (the "full" path: one tile). Returns a 0-dim fp32 tensor.
    """
    check_int("tile_tokens", tile_tokens)
    recompute = recompute and torch.is_grad_enabled()
    total = hidden.new_zeros((), dtype=torch.float32)
    for h, y in zip(hidden.split(tile_tokens), labels.split(tile_tokens)):  # [t, D], [t]
        if recompute:
            part = checkpoint(_tile_ce_sum, head, transform, h, y, use_reentrant=False, preserve_rng_state=False)
        else:
            part = _tile_ce_sum(head, transform, h, y)
        total = total + part
    return total


@functools.cache
def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def liger_unsupported_reason(
    hidden: torch.Tensor, head, transform: LogitTransform, check_weight: bool = True
) -> str | None:
    """Why liger's fused kernel cannot run here (None: it can). ``check_weight=False``: whether it
    could run once the engine makes the head's full weight available (a plan, not the call)."""
    if not liger_available():
        return "liger-kernel is not installed (pip install 'ulysses_sp[liger]')"
    if not hidden.is_cuda:
        return "liger-kernel runs on CUDA tensors only"
    if type(head) is not torch.nn.Linear:
        # the kernel reads head.weight: an adapter on the head (lm_head in PEFT's target_modules or
        # modules_to_save) would be skipped, so such a head runs on the torch path, which calls it
        return (
            f"the output head is a {type(head).__module__}.{type(head).__qualname__}, not a plain torch.nn.Linear "
            "(a PEFT adapter on lm_head, from target_modules or modules_to_save, needs the torch path: "
            "use_liger=False, or leave lm_head out of target_modules)"
        )
    reason = head_weight_unavailable_reason(head.weight) if check_weight else None
    if reason is not None:
        return reason
    if transform.scale != 1.0 and head.bias is not None:
        return "a logit scale with a biased head cannot be folded into the hidden states"
    return None


def head_weight_unavailable_reason(weight: torch.Tensor) -> str | None:
    """Why a fused kernel cannot read the head's full weight here (None: it can). A ZeRO-3 weight
    is readable while gathered: integrations.deepspeed.initialize registers it with the loss module."""
    if hasattr(weight, "ds_id"):
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        if weight.ds_status != ZeroParamStatus.AVAILABLE:
            return (
                "the head's weight is ZeRO-3 partitioned and not gathered here; train through "
                "ulysses_sp.integrations.deepspeed.initialize(CausalLMLoss(model, topology), ...), which has "
                "ZeRO-3 gather it for the loss"
            )
    if type(weight).__name__ == "DTensor":
        return "the head's weight is an FSDP DTensor shard; the fused kernel needs the full weight"
    return None


def liger_cross_entropy_sum(
    hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Linear, transform: LogitTransform = LogitTransform()
) -> torch.Tensor:
    """Same value as :func:`tiled_cross_entropy_sum` through liger's fused linear cross-entropy.

    hidden [T, D] (CUDA), labels [T]. A logit scale is folded into ``hidden`` (bias-free heads only:
    see :func:`liger_unsupported_reason`); the softcap is liger's own.
    """
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    if transform.scale != 1.0:
        hidden = hidden * transform.scale
    return liger_fused_linear_cross_entropy(
        hidden.contiguous(),
        head.weight,
        labels.contiguous(),
        bias=head.bias,
        ignore_index=IGNORE_INDEX,
        reduction="sum",
        softcap=transform.softcap,
    ).float()
