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

A norm fused onto liger-kernel's kernel beforehand (fused_ops.py) runs that kernel instead of the
function below: it saves the same (x, rstd), and its single pass makes no input-sized fp32
temporaries for tiles to bound; its output still carries the source.

Only norms whose forward is Llama's (same bytecode, names and constants: the classes transformers
copies from LlamaRMSNorm, e.g. Mistral, Qwen2/3, Phi-3, DeepSeek-V3) are replaced, per instance;
others (Gemma's 1 + weight, OLMo-2's order of cast and scale) keep their own forward.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from ..core.wrappers import unwrap

_LLAMA_CODE = LlamaRMSNorm.forward.__code__


def is_llama_rms_norm(module: torch.nn.Module) -> bool:
    """Whether ``module``'s forward is LlamaRMSNorm's (same bytecode, names and constants)."""
    code = getattr(type(module).forward, "__code__", None)
    return code is not None and all(
        getattr(code, attr) == getattr(_LLAMA_CODE, attr) for attr in ("co_code", "co_names", "co_consts")
    )


TILE_ELEMENTS = 1 << 24  # elements per tile: each fp32 temporary of the math is 64 MiB at most


def tile_rows(d: int) -> int:
    """Rows of width ``d`` per tile."""
    return max(1, TILE_ELEMENTS // d)


def _normalize(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LlamaRMSNorm's forward ops in its order: x [..., d] -> (out [..., d], rstd [..., 1] fp32)."""
    rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)  # [..., 1]
    return weight * (x.float() * rstd).to(x.dtype), rstd


def _grads(x, weight, rstd, grad_out, need_x: bool, need_w: bool):
    """One tile's backward: x, grad_out [R, d], rstd [R, 1] -> (grad_x [R, d] fp32 or None,
    grad_weight [d] fp32 partial sum or None)."""
    xhat = x.float() * rstd  # [R, d] fp32, recomputed
    grad_x = grad_w = None
    if need_w:
        # as autograd for `weight * n`: the product in the output dtype, summed in fp32
        grad_w = (grad_out * xhat.to(x.dtype)).sum(0, dtype=torch.float32)  # [d]
    if need_x:
        grad_n = (grad_out * weight).to(x.dtype).float()  # the cast's backward, then fp32
        grad_x = rstd * (grad_n - xhat * (grad_n * xhat).mean(-1, keepdim=True))
    return grad_x, grad_w


@dataclass(frozen=True)
class NormSource:
    """What an RMSNorm output [..., d] is recomputed from (:func:`recompute_output`): its input
    x [..., d], a copy of the weight [d] as the forward used it (ZeRO-3 may release the gathered
    one), eps, and the fused kernel that computed it, if one did."""

    x: torch.Tensor
    weight: torch.Tensor
    eps: float
    kernel: Callable | None = None  # the fused kernel the forward ran (fused_ops.py), for the same rounding


SOURCE_ATTR = "_ulysses_sp_norm_source"


def _attach_source(
    out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float, kernel: Callable | None = None
) -> None:
    """Let a consumer of ``out`` (the tiled MLP) keep x, which the norm keeps anyway, instead of out.
    Strong references: whether a consumer takes the source must not depend on what else is alive,
    since a checkpoint's recomputation has to save what the first forward saved. They live as long
    as ``out``, so only norms inside decoder layers attach them (their outputs die within the layer;
    a final norm's output, the returned hidden state, would keep its input alive). The output's
    version voids it after an in-place change."""
    setattr(out, SOURCE_ATTR, (NormSource(x, weight.detach().clone(), eps, kernel), out._version))


def norm_source(out: torch.Tensor) -> NormSource | None:
    """The source of an RMSNormFunction output not changed in place since, else None."""
    attached = getattr(out, SOURCE_ATTR, None)
    return attached[0] if attached is not None and attached[1] == out._version else None


def recompute_output(x: torch.Tensor, weight: torch.Tensor, eps: float, kernel: Callable | None = None) -> torch.Tensor:
    """The norm's output for rows x [r, d], rstd included: the forward's ops, or its fused ``kernel``
    (row reductions may round differently for another row count, so equal up to rounding)."""
    out = None if kernel is None else kernel(x, weight, eps)
    return _normalize(x, weight, eps)[0] if out is None else out


class RMSNormFunction(torch.autograd.Function):
    """``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` computed in fp32, as LlamaRMSNorm.

    x [..., d], weight [d] -> [..., d]. Saves x and rstd [R, 1] (fp32, R = x.numel() / d) only;
    ``attach_source`` lets a consumer recompute the output from x (:func:`norm_source`). The
    fp32 math runs over tiles of ``rows_per_tile`` rows, so its temporaries (several fp32 copies of
    the input in eager mode) stay bounded at any sequence length; rows are independent, so the output
    is the same bit for bit. Not used under torch.compile (the norm's plain ops are, see ``_forward``).
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, rows_per_tile: int, attach_source: bool = False
    ) -> torch.Tensor:
        assert rows_per_tile >= 1, rows_per_tile
        d = x.shape[-1]
        flat = x.reshape(-1, d)  # [R, d]
        # the output is allocated in x's shape, not viewed into it: a custom Function's view output
        # could not be changed in place, which transformers' norm output can
        if flat.shape[0] <= rows_per_tile:
            out, rstd = _normalize(x, weight, eps)  # [..., d], [..., 1]
            rstd = rstd.view(-1, 1)  # [R, 1]
        else:
            out = x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype))  # [..., d]
            out_flat = out.view(-1, d)  # [R, d]
            rstd = flat.new_empty((flat.shape[0], 1), dtype=torch.float32)  # [R, 1]
            for start in range(0, flat.shape[0], rows_per_tile):
                out_flat[start : start + rows_per_tile], rstd[start : start + rows_per_tile] = _normalize(
                    flat[start : start + rows_per_tile], weight, eps
                )
        ctx.save_for_backward(x, weight, rstd)
        ctx.rows = rows_per_tile
        if attach_source:
            _attach_source(out, x, weight, eps)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        d, rows = x.shape[-1], ctx.rows
        flat, grad_flat = x.reshape(-1, d), grad_out.reshape(-1, d)  # [R, d]
        # returned whole, not as a view of a flat buffer: autograd adds the residual stream's gradient
        # into a tensor in place only when nothing else holds its storage (tiled_mlp.py says more)
        grad_x = x.new_empty(x.shape) if need_x else None  # [..., d]
        grad_rows = None if grad_x is None else grad_x.view(-1, d)  # [R, d]
        grad_w = torch.zeros(d, dtype=torch.float32, device=x.device) if need_w else None  # [d]
        for start in range(0, flat.shape[0], rows):
            gx, gw = _grads(
                flat[start : start + rows],
                weight,
                rstd[start : start + rows],
                grad_flat[start : start + rows],
                need_x,
                need_w,
            )
            if need_x:
                grad_rows[start : start + rows] = gx  # cast to x.dtype
            if need_w:
                grad_w += gw
        return (grad_x, grad_w.to(weight.dtype) if need_w else None, None, None, None)


#: a norm's fused kernel (fused_ops.py): ``fused(x, weight, eps)`` -> the output, or None where it cannot run
FUSED_NORM_ATTR = "_ulysses_sp_fused_norm"


def _forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():
        # Inductor fuses the math into one kernel and its partitioner keeps only what the backward
        # needs; the Function would hide the ops from both (and torch 2.11's dynamo could not retrace
        # it for a second sequence length: an H100 run of 64K then 128K failed in the autograd HOP)
        return _normalize(hidden_states, self.weight, self.variance_epsilon)[0]
    fused = getattr(self, FUSED_NORM_ATTR, None)
    out = None if fused is None else fused(hidden_states, self.weight, self.variance_epsilon)
    if out is not None:  # the kernel saves what RMSNormFunction does (x, rstd), with no big temporaries
        if self._ulysses_sp_in_layer:
            _attach_source(out, hidden_states, self.weight, self.variance_epsilon, fused)
        return out
    return RMSNormFunction.apply(
        hidden_states, self.weight, self.variance_epsilon, tile_rows(hidden_states.shape[-1]), self._ulysses_sp_in_layer
    )


def is_norm_recompute_enabled(model: torch.nn.Module) -> bool:
    return getattr(unwrap(model), "_ulysses_sp_rms_norms", None) is not None


def enable_rms_norm_recompute(model: torch.nn.Module) -> list[str]:
    """Make every Llama-style RMSNorm of ``model`` (of the model inside, for a PEFT model) save only
    its input (see the module docstring). Scoped to this model's norm instances;
    a norm on liger's kernel (fused_ops.py, fused before) keeps it, with the source attached;
    :func:`disable_rms_norm_recompute` undoes it. Returns the names of the replaced norms; raises
    ``ValueError`` when there is none."""
    inner = unwrap(model)
    if getattr(inner, "_ulysses_sp_rms_norms", None) is not None:
        raise ValueError("RMSNorm recompute is already enabled on this model")
    norms = {name: m for name, m in inner.named_modules() if is_llama_rms_norm(m)}
    if not norms:
        kinds = sorted({type(m).__name__ for m in inner.modules() if "norm" in type(m).__name__.lower()})
        raise ValueError(
            f"{type(inner).__name__} has no Llama-style RMSNorm to recompute (its norms: {kinds}); "
            "leave the option off for this model"
        )
    in_layers = {id(m) for layer in getattr(inner.base_model, "layers", ()) for m in layer.modules()}
    for module in norms.values():
        module._ulysses_sp_in_layer = id(module) in in_layers  # see _attach_source
        module._ulysses_sp_prior_forward = module.__dict__.get("forward")  # fused_ops' forward, or None
        module.forward = types.MethodType(_forward, module)
    inner._ulysses_sp_rms_norms = list(norms.values())
    return list(norms)


def disable_rms_norm_recompute(model: torch.nn.Module):
    """Undo :func:`enable_rms_norm_recompute`; returns ``model``."""
    inner = unwrap(model)
    norms = getattr(inner, "_ulysses_sp_rms_norms", None)
    if norms is None:
        raise ValueError("RMSNorm recompute is not enabled on this model")
    for module in norms:
        prior = module._ulysses_sp_prior_forward
        del module.forward, module._ulysses_sp_in_layer, module._ulysses_sp_prior_forward
        if prior is not None:
            module.forward = prior
    del inner._ulysses_sp_rms_norms
    return model
