"""Per-token log-probabilities and entropy of the next token on the local shard, in token tiles.

Shape legend: B batch, s = S/P local tokens, T = B*s tokens flattened, t tokens per tile, D hidden
size, V vocabulary.

What RL trainers need for every completion token: log p(sampled next token) under the policy (with
gradients) and under a reference model (without), and often the entropy of the next-token
distribution. The head runs over tiles of ``t`` tokens as in the tiled cross-entropy (tiled_ce.py):
at any moment only one tile's [t, V] fp32 logits exist, in the forward and, recomputed under
non-reentrant checkpointing, in the backward. Under ``torch.no_grad()`` (a reference model) nothing
is kept for a backward at all. The logits get the model family's transform (logits.py) and are then
divided by ``temperature``, as samplers do before the softmax, so the log-probabilities are those of
the distribution the rollout was sampled from.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.utils.checkpoint import checkpoint

from ..core.topology import SPTopology
from .causal_lm import shard_hidden_states, vocab_size
from .logits import LogitTransform
from .tiled_ce import DEFAULT_TILE_BYTES, IGNORE_INDEX, liger_unsupported_reason, tile_tokens_for_budget


def _tile(head, transform: LogitTransform, temperature: float, entropy: bool, h: torch.Tensor, y: torch.Tensor):
    """h [t, D], y [t] -> (log p(y) [t], and the entropy [t] when asked); 0 where y is ignored."""
    logp = torch.log_softmax(transform(head(h)).float() / temperature, dim=-1)  # [t, V] fp32
    keep = y != IGNORE_INDEX
    picked = logp.gather(1, y.clamp(min=0).unsqueeze(1)).squeeze(1) * keep  # [t]
    if not entropy:
        return (picked,)
    return picked, -(logp.exp() * logp).sum(-1) * keep  # [t], [t]


def token_logprobs(
    model: torch.nn.Module,
    local_batch: Mapping[str, torch.Tensor],
    topology: SPTopology,
    *,
    temperature: float = 1.0,
    entropy: bool = False,
    tile_tokens: int | None = None,
    tile_bytes: int = DEFAULT_TILE_BYTES,
    use_liger: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(next token) of this rank's shard, fp32 [B, s]: at position ``i`` the log-probability of
    ``shift_labels[:, i]`` (the token after ``i`` in the full sequence); 0 where the label is ignored
    (-100: prompts, padding, document ends). With ``entropy``, also the entropy of the next-token
    distribution [B, s] (0 where ignored).

    ``local_batch`` is a shard from :func:`ulysses_sp.shard_batch` (packed rows included: each
    document gets its own log-probabilities). Differentiable when grad is enabled (the policy); call
    under ``torch.no_grad()`` for a reference model (another model in the same process with SP applied
    separately). ``tile_tokens`` / ``tile_bytes``: as :func:`ulysses_sp.causal_lm_loss`. ``use_liger``:
    None runs liger-kernel's fused linear cross-entropy (per token, no logits at all) when it can (CUDA,
    installed, a plain Linear head, no entropy asked, a temperature it can fold into the hidden states),
    True requires it, False uses the torch path.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (it divides the logits), got {temperature}")
    hidden, labels, head, transform = shard_hidden_states(model, local_batch, topology)  # [T, D], [T]
    shape = local_batch["shift_labels"].shape  # [B, s]
    reason = "disabled" if use_liger is False else _liger_reason(hidden, head, transform, temperature, entropy)
    if use_liger and reason is not None:
        raise ValueError(f"use_liger=True but liger's fused log-probs cannot run: {reason}")
    if reason is None:
        return _liger_logprobs(hidden, labels, head, transform, temperature).view(shape)
    tile = tile_tokens if tile_tokens is not None else tile_tokens_for_budget(vocab_size(model), tile_bytes)
    parts = []
    for h, y in zip(hidden.split(tile), labels.split(tile)):  # [t, D], [t]
        if torch.is_grad_enabled():
            args = (head, transform, temperature, entropy, h, y)
            parts.append(checkpoint(_tile, *args, use_reentrant=False, preserve_rng_state=False))
        else:
            parts.append(_tile(head, transform, temperature, entropy, h, y))
    out = [torch.cat(column).view(shape) for column in zip(*parts)]  # [B, s] each
    return (out[0], out[1]) if entropy else out[0]


def _liger_reason(hidden, head, transform: LogitTransform, temperature: float, entropy: bool) -> str | None:
    """Why liger cannot give these log-probs (None: it can)."""
    if entropy:
        return "liger computes no entropy"
    reason = liger_unsupported_reason(hidden, head, transform)
    if reason is not None:
        return reason
    if temperature != 1.0 and (transform.softcap is not None or head.bias is not None):
        return "a temperature folds into the hidden states only for a bias-free head without softcapping"
    return None


def _liger_logprobs(hidden, labels, head, transform: LogitTransform, temperature: float) -> torch.Tensor:
    """log p(labels) [T] by liger's fused linear cross-entropy per token (its loss is -log p; 0 where
    ignored), the scale and 1 / temperature folded into ``hidden`` [T, D]."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    factor = transform.scale / temperature
    if factor != 1.0:
        hidden = hidden * factor
    loss = liger_fused_linear_cross_entropy(
        hidden.contiguous(),
        head.weight,
        labels.contiguous(),
        bias=head.bias,
        ignore_index=IGNORE_INDEX,
        reduction="none",
        softcap=transform.softcap,
    )
    return -loss.float()
