"""What a model family does to ``lm_head(hidden)`` before the softmax, reproduced by the sharded loss.

transformers' causal LMs post-process their logits in family-specific ways (a scale, Gemma's
softcap, Cohere's ``logit_scale``, Granite's ``logits_scaling``). The tiled loss never builds the
model's logits, so it applies the same transform itself; processing it does not reproduce is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LogitTransform:
    """What a model does to ``lm_head(hidden)`` before the softmax: ``z * scale``, then, when
    ``softcap`` is set, ``softcap * tanh(z / softcap)`` (Gemma-style). Applied in the logits' dtype,
    before the fp32 cast, as transformers' models do."""

    scale: float = 1.0
    softcap: float | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


# How ``config.logits_scaling`` enters each model family's logits (the name means different things).
_LOGITS_SCALING = {
    "granite": "divide",
    "granite_swa": "divide",
    "granitemoe": "divide",
    "granitemoe_swa": "divide",
    "granitemoeshared": "divide",
    "granitemoehybrid": "divide",
    "minicpm3": "divide",  # divides the hidden states before a bias-free head: the same logits
    "hyperclovax": "multiply",
}
# Logit processing seen in transformers that this module does not reproduce.
_UNSUPPORTED_CONFIG = ("output_multiplier", "unpadded_vocab_size")
_UNSUPPORTED_MODULE = ("final_logits_bias", "logit_softcap")


def logit_transform(model: torch.nn.Module) -> LogitTransform:
    """The scale / softcap ``model`` applies to ``lm_head(hidden)``; ValueError for processing we
    do not reproduce. Covers a bias in the head (part of the module call), Gemma-style
    ``final_logit_softcapping``, Cohere's ``logit_scale`` and the families in ``_LOGITS_SCALING``."""
    config = model.config.get_text_config(decoder=True)
    name = type(model).__name__
    found = [a for a in _UNSUPPORTED_CONFIG if getattr(config, a, None) is not None]
    found += [a for a in _UNSUPPORTED_MODULE if getattr(model, a, None) is not None]
    if found:
        raise ValueError(
            f"{name} post-processes its logits ({', '.join(found)}), which ulysses_sp's "
            "sharded loss does not reproduce; compute the loss from the model's logits instead"
        )
    scale = 1.0
    logit_scale = getattr(model, "logit_scale", None)
    if logit_scale is not None:
        if not isinstance(logit_scale, (int, float)):
            raise ValueError(f"{name}.logit_scale is a {type(logit_scale).__name__}, not a number; unsupported")
        scale = float(logit_scale)
    scaling = getattr(config, "logits_scaling", None)
    if scaling is not None:
        how = _LOGITS_SCALING.get(config.model_type)
        if how is None:
            raise ValueError(
                f"{name} has config.logits_scaling={scaling} with no known meaning for model_type "
                f"{config.model_type!r}; known: {sorted(_LOGITS_SCALING)}"
            )
        if config.model_type == "minicpm3" and getattr(model.get_output_embeddings(), "bias", None) is not None:
            raise ValueError(f"{name} scales the hidden states before a biased head; unsupported")
        scale *= 1.0 / scaling if how == "divide" else float(scaling)
    softcap = getattr(model, "final_logit_softcapping", None) or getattr(config, "final_logit_softcapping", None)
    return LogitTransform(scale=scale, softcap=float(softcap) if softcap else None)
