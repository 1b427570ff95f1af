"""PEFT-wrapped models: the transformers model that SP works on, and the adapters it supports.

``peft.get_peft_model(model, LoraConfig(...))`` returns a ``PeftModel`` whose ``base_model`` is a
tuner (``LoraModel``) whose ``model`` is the transformers model, with each adapter injected into it
in place (``q_proj`` becomes a ``lora.Linear`` holding the frozen ``base_layer`` and ``lora_A`` /
``lora_B``). Everything ulysses_sp does to a model (the attention wrapper and the backbone's hook,
the sharded loss, the memory features) is done to that inner model, and the adapters run inside its
modules, so they are honoured without the wrapper's forward; a LoRA ``lm_head`` included, as the
tiled loss calls the head as a module.

What only the wrapper's forward does cannot run under SP, where the loss calls the backbone on one
shard of the sequence, and is refused: prompt learning (virtual tokens prepended to the sequence),
activated LoRA (its offsets are found in the full ``input_ids``), per-sample adapters
(``adapter_names``), and tuners other than LoRA, some of which act in their forward (X-LoRA's
scaling pass).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import torch

SUPPORTED_PEFT_TYPES = ("LORA",)
#: inputs only ``PeftModel.forward`` understands (peft's ``special_peft_forward_args``)
WRAPPER_INPUTS = ("adapter_names", "alora_offsets")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (``PeftModel``, ``PeftMixedModel`` or a tuner
    such as ``LoraModel``); any other module unchanged. Checks nothing (:func:`check_adapters` does)."""
    peft = sys.modules.get("peft")
    if peft is None:  # no PEFT object can exist before peft is imported; a plain model needs no import
        return model
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(model, (peft.PeftModel, peft.PeftMixedModel)):
        model = model.base_model  # a tuner, or for prompt learning the transformers model itself
    return model.model if isinstance(model, BaseTuner) else model


def check_adapters(model: torch.nn.Module, inputs: Iterable[str] = ()) -> None:
    """Raise a ValueError when ``model`` carries PEFT adapters that SP cannot honour (see the module
    docstring), or when ``inputs`` (a model call's keyword names) holds one only the PEFT wrapper's
    forward understands. Reads ``peft_config`` (a PEFT wrapper's or tuner's, or transformers'
    ``add_adapter``'s); a model without one passes."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return
    for name, config in configs.items():
        kind = getattr(config.peft_type, "value", config.peft_type)
        if config.is_prompt_learning:
            raise ValueError(
                f"PEFT adapter {name!r} is prompt learning ({kind}): PeftModel.forward prepends virtual tokens "
                "to the sequence, which a shard of it cannot do (and the sharded loss calls the backbone "
                "directly); ulysses_sp supports LoRA adapters, e.g. get_peft_model(model, LoraConfig(...))"
            )
        if kind not in SUPPORTED_PEFT_TYPES:
            raise ValueError(
                f"PEFT adapter {name!r} is {kind}; ulysses_sp supports {list(SUPPORTED_PEFT_TYPES)} adapters "
                "(injected into the model's layers, tested against the non-SP model); use a LoraConfig"
            )
        if getattr(config, "alora_invocation_tokens", None) is not None:
            raise ValueError(
                f"PEFT adapter {name!r} is an activated LoRA (alora_invocation_tokens set): PeftModel.forward "
                "finds its activation offsets in the full input_ids, which no shard holds; use a plain "
                "LoraConfig (alora_invocation_tokens=None) under sequence parallelism"
            )
    wrapper_only = sorted(set(inputs) & set(WRAPPER_INPUTS))
    if wrapper_only:
        raise ValueError(
            f"the batch has {wrapper_only}, which only PeftModel.forward understands; the sharded loss calls "
            "the backbone, where they would be ignored: activate the adapter with model.set_adapter(name) "
            "instead of per-sample adapter_names"
        )
