"""RMSNorm that keeps only its input for the backward and recomputes the rest.

Shape legend: x [..., d] (B s d for decoder norms, B s n h_d for per-head q/k norms), d the
normalised size; rstd [..., 1] fp32.

transformers' Llama-style RMSNorm upcasts to fp32 under autograd, so each call leaves an fp32 copy
of its input (4 bytes per element) and the bf16 normalised tensor (2 bytes) saved for the backward,
on top of the input itself: 24 KiB per token for a 4096-wide norm, two norms per decoder layer. At
long sequences that is a quarter of what one checkpointed layer holds during its backward.
:class:`RMSNormFunction` saves x (which the layer keeps anyway) and rstd [..., 1] and recomputes the
normalised tensor in the backward: the same forward result, bit for bit, and gradients equal up to
fp32 rounding (the closed-form backward sums in another order).

Only norms whose forward is Llama's (same bytecode, names and constants: the classes transformers
copies from LlamaRMSNorm, e.g. Mistral, Qwen2/3, Phi-3, DeepSeek-V3) are replaced, per instance;
others (Gemma's 1 + weight, OLMo-2's order of cast and scale) keep their own forward.
"""

from __future__ import annotations

import types

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

_LLAMA_CODE = LlamaRMSNorm.forward.__code__


def _is_llama_rms_norm(module: torch.nn.Module) -> bool:
    code = getattr(type(module).forward, "__code__", None)
    return code is not None and all(getattr(code, attr) == getattr(_LLAMA_CODE, attr)
                                    for attr in ("co_code", "co_names", "co_consts"))


class RMSNormFunction(torch.autograd.Function):
    """``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` computed in fp32, as LlamaRMSNorm.

    x [..., d], weight [d] -> [..., d]. Saves x and rstd [..., 1] (fp32) only.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()  # [..., d]
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # [..., 1]
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd  # [..., d] fp32, recomputed
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:
            # as autograd for `weight * n`: product in the output dtype, summed to [d]
            grad_weight = (grad_out * xhat.to(x.dtype)).sum_to_size(weight.shape).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            grad_n = (grad_out * weight).to(x.dtype).float()  # the cast's backward, then fp32
            grad_x = rstd * (grad_n - xhat * (grad_n * xhat).mean(-1, keepdim=True))
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_weight, None


def _forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


def enable_rms_norm_recompute(model: torch.nn.Module) -> list[str]:
    """Make every Llama-style RMSNorm of ``model`` save only its input (see the module docstring).
    Scoped to this model's norm instances; :func:`disable_rms_norm_recompute` undoes it. Returns the
    names of the replaced norms; raises ``ValueError`` when there is none."""
    if getattr(model, "_ulysses_sp_rms_norms", None) is not None:
        raise ValueError("RMSNorm recompute is already enabled on this model")
    norms = {name: m for name, m in model.named_modules() if _is_llama_rms_norm(m)}
    if not norms:
        kinds = sorted({type(m).__name__ for m in model.modules() if "norm" in type(m).__name__.lower()})
        raise ValueError(f"{type(model).__name__} has no Llama-style RMSNorm to recompute (its norms: {kinds}); "
                         "leave the option off for this model")
    for module in norms.values():
        module.forward = types.MethodType(_forward, module)
    model._ulysses_sp_rms_norms = list(norms.values())
    return list(norms)


def disable_rms_norm_recompute(model: torch.nn.Module):
    """Undo :func:`enable_rms_norm_recompute`; returns ``model``."""
    norms = getattr(model, "_ulysses_sp_rms_norms", None)
    if norms is None:
        raise ValueError("RMSNorm recompute is not enabled on this model")
    for module in norms:
        del module.forward
    del model._ulysses_sp_rms_norms
    return model
