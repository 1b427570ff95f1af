"""Fused elementwise kernels on one model: liger-kernel's RMSNorm, SiLU * mul and RoPE.

Shape legend: x [..., d] (B s d for decoder norms, B s n h_d for per-head q/k norms); gate, up
[B s d_ff]; q [B n s h_d], k [B n_kv s h_d], cos, sin [B s h_d] (the layout transformers' attention
hands to ``apply_rotary_pos_emb``); s = S/P local tokens.

Why by hand: liger's ``apply_liger_kernel_to_<family>`` replaces classes and
``apply_rotary_pos_emb`` in transformers' modeling module, so every model of the family in the
process changes, for good. Here the instances of one model change, and
:func:`unfuse_elementwise` restores their forwards:

* RMSNorm: a norm whose forward is Llama's (rms_norm.py: same bytecode) runs liger's kernel in
  Llama's casting: rstd in fp32, the normalised input cast back to x's dtype, times the weight.
  Gemma's ``1 + weight``, OLMo-2's order of cast and scale keep their own forward.
* MLP: a module whose forward is LlamaMLP's (same bytecode) and whose ``act_fn`` is SiLU computes
  ``down_proj(silu_mul(gate_proj(x), up_proj(x)))``: the projections stay module calls (LoRA
  adapters, ZeRO-3 gathers), only the activation and the product are fused. Liger saves gate and
  up for the backward and recomputes the SiLU: one [B s d_ff] tensor less than torch.
* RoPE: an attention module whose forward calls a module-level ``apply_rotary_pos_emb`` with Llama's
  code (the half rotation of the whole head: not partial rotary, not mRoPE, which have other code)
  gets a copy of its forward (its decorators' wrappers copied around it) whose global
  ``apply_rotary_pos_emb`` is the fused one. The class and the modeling module stay as they are.

Each fused op keeps the module's own torch computation where the kernel would compute something
else or cannot run: inputs of mixed dtypes (transformers promotes: fp32 weights under autocast give
an fp32 norm output, liger's kernels the input's dtype), tensors off the kernels' device, and while
torch.compile traces: Inductor fuses a compiled layer's elementwise work itself, so the kernels
would add nothing there but the risk of a graph break (liger's autograd Functions launch triton
kernels from Python). With ``compile_layers`` they run where compile does not reach (the final norm).

With the RMSNorm recompute (rms_norm.py), its norms run liger's kernel: it saves what the recompute
saves (x, rstd) and makes no input-sized fp32 temporaries for tiles to bound; the tiled MLP
recomputes its input tiles with the same kernel (the forward's rounding). Order:
:func:`fuse_elementwise`, then ``tile_mlp`` / ``enable_rms_norm_recompute`` (they wrap the forwards
set here), ``apply`` at any point, ``compile_layers`` last; undone in reverse.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from packaging.version import Version
from transformers.activations import SiLUActivation
from transformers.models.llama import modeling_llama

from ..core.wrappers import unwrap
from . import rms_norm
from .compile import is_compiled
from .tiled_mlp import is_mlp_tiled

logger = logging.getLogger("ulysses_sp")

#: liger-kernel releases whose Functions take the arguments used here (setup.cfg's extra; tested: 0.8.5)
MIN_LIGER = Version("0.5")
_ROPE = "apply_rotary_pos_emb"
_SILU_CODE = inspect.unwrap(SiLUActivation.forward).__code__


@dataclass(frozen=True)
class FusedKernels:
    """The fused ops and the device type they run on; each returns what the torch ops return.

    ``rms_norm(x [..., d], weight [d], eps) -> [..., d]`` in Llama's casting;
    ``silu_mul(gate, up) -> silu(gate) * up`` (same shape); ``rope(q [B n s h_d], k [B n_kv s h_d],
    cos [B s h_d], sin [B s h_d]) -> (q, k)`` rotated as Llama's ``apply_rotary_pos_emb``.
    """

    rms_norm: Callable
    silu_mul: Callable
    rope: Callable
    device_type: str = "cuda"

    def runs_on(self, *tensors: torch.Tensor) -> bool:
        """Whether the kernels compute what the torch ops would for these inputs (module docstring)."""
        first = tensors[0]
        return not torch.compiler.is_compiling() and all(
            t.device.type == self.device_type and t.dtype == first.dtype for t in tensors
        )

    def rms_norm_where_it_runs(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
        """The norm's output by the kernel, or None where it would differ (module docstring)."""
        return self.rms_norm(x, weight, eps) if self.runs_on(x, weight) else None


def liger_kernels() -> FusedKernels:
    """liger-kernel's RMSNorm, SiLU * mul and RoPE Functions; ``ValueError`` when liger-kernel (with
    triton) cannot be imported or is older than :data:`MIN_LIGER`."""
    try:
        version = Version(importlib.metadata.version("liger-kernel"))
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.rope import LigerRopeFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except (ImportError, importlib.metadata.PackageNotFoundError) as error:
        raise ValueError(
            f"fused elementwise kernels need liger-kernel with triton on a CUDA machine ({error}); install it with "
            "pip install 'ulysses_sp[liger]', or leave the fused ops off (the model keeps its torch ops)"
        ) from error
    if version < MIN_LIGER:
        raise ValueError(f"fused elementwise kernels need liger-kernel >= {MIN_LIGER}, found {version}; upgrade it")

    def rms_norm(x, weight, eps):
        # offset 0 and "llama" casting: LlamaRMSNorm's math. in_place=False: the kernel would otherwise
        # write the input gradient into the output's gradient, which autograd may also have handed to
        # another branch (a norm whose output is added to the residual, as GLM-4's post-norms)
        return LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama", False)

    def rope(q, k, cos, sin):
        return LigerRopeFunction.apply(q, k, cos, sin)

    return FusedKernels(rms_norm, LigerSiLUMulFunction.apply, rope)


def is_fused(model: torch.nn.Module) -> bool:
    return getattr(unwrap(model), "_ulysses_sp_fused", None) is not None


def is_silu(module) -> bool:
    code = getattr(type(module).forward, "__code__", None)
    return isinstance(module, torch.nn.SiLU) or code == _SILU_CODE


def is_llama_mlp(module: torch.nn.Module) -> bool:
    """LlamaMLP's forward (same bytecode: ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``) with SiLU."""
    return _same_code(type(module).forward, modeling_llama.LlamaMLP.forward) and is_silu(
        getattr(module, "act_fn", None)
    )


def _function(obj):
    """The Python function behind ``obj``: under its ``functools.wraps`` wrappers, or inside the module
    ``kernels`` makes of a function (transformers' ``use_kernel_forward_from_hub`` on
    ``apply_rotary_pos_emb`` when ``kernels`` is installed: the function is a cell of its forward)."""
    if isinstance(obj, torch.nn.Module):
        cells = getattr(type(obj).forward, "__closure__", None) or ()
        found = [c.cell_contents for c in cells if _cell_holds(c) and inspect.isfunction(c.cell_contents)]
        obj = found[0] if len(found) == 1 else None
    obj = inspect.unwrap(obj) if callable(obj) else None
    return obj if inspect.isfunction(obj) else None


def _same_code(fn, reference) -> bool:
    a, b = _function(fn), _function(reference)
    return (
        a is not None
        and b is not None
        and all(getattr(a.__code__, x) == getattr(b.__code__, x) for x in ("co_code", "co_names", "co_consts"))
    )


def has_llama_rope(module: torch.nn.Module) -> bool:
    """Whether ``module``'s forward calls a module-level ``apply_rotary_pos_emb`` with Llama's code
    (and Llama's ``rotate_half``)."""
    raw = _function(getattr(type(module), "forward", None))
    if raw is None or _ROPE not in raw.__code__.co_names:
        return False
    rope = _function(raw.__globals__.get(_ROPE))
    return (
        rope is not None
        and _same_code(rope, modeling_llama.apply_rotary_pos_emb)
        and _same_code(rope.__globals__.get("rotate_half"), modeling_llama.rotate_half)
    )


def _with_global(fn, name: str, value):
    """A copy of ``fn`` whose innermost function reads the global ``name`` as ``value``; each wrapper
    around it (``functools.wraps``: ``__wrapped__``, the wrapped function in one closure cell) is copied
    around the copy. None when a wrapper does not hold what it wraps in its closure."""
    inner = getattr(fn, "__wrapped__", None)
    if inner is None:
        # without "__name__": Dynamo reads the globals of a function whose globals name a module from
        # that module, which holds the original value
        scope = {k: v for k, v in fn.__globals__.items() if k != "__name__"} | {name: value}
        copy = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    else:
        cells = fn.__closure__ or ()
        held = [i for i, cell in enumerate(cells) if _cell_holds(cell, inner)]
        new_inner = _with_global(inner, name, value) if len(held) == 1 else None
        if new_inner is None:
            return None
        closure = tuple(types.CellType(new_inner) if i == held[0] else cell for i, cell in enumerate(cells))
        copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, closure)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__dict__.update(fn.__dict__)  # a wrapper's __wrapped__ and signature among them
    copy.__qualname__, copy.__doc__, copy.__module__ = fn.__qualname__, fn.__doc__, fn.__module__
    if inner is not None:
        copy.__wrapped__ = new_inner
    return copy


def _cell_holds(cell, value=None) -> bool:
    """Whether ``cell`` is filled (and holds ``value``, when given)."""
    try:
        contents = cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return value is None or contents is value


def _fused_rope(kernels: FusedKernels, torch_rope: Callable) -> Callable:
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        # the kernel reads q, k as [B n s h_d] and cos, sin as [B s h_d] of the whole head
        if (
            unsqueeze_dim == 1
            and q.dim() == k.dim() == 4
            and cos.dim() == 3
            and cos.shape[-1] == q.shape[-1]
            and kernels.runs_on(q, k, cos, sin)
        ):
            return kernels.rope(q, k, cos, sin)
        return torch_rope(q, k, cos, sin, unsqueeze_dim)

    return apply_rotary_pos_emb


def _norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    out = getattr(self, rms_norm.FUSED_NORM_ATTR)(hidden_states, self.weight, self.variance_epsilon)
    return type(self).forward(self, hidden_states) if out is None else out


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)  # [B s d_ff] each
    kernels: FusedKernels = self._ulysses_sp_fused_kernels
    product = kernels.silu_mul(gate, up) if kernels.runs_on(gate, up) else self.act_fn(gate) * up
    return self.down_proj(product)


def fuse_elementwise(model: torch.nn.Module, kernels: FusedKernels | None = None) -> list[str]:
    """Run the RMSNorms, SiLU-gated MLPs and rotary embeddings of ``model`` (of the model inside, for
    a PEFT model) on fused kernels: ``kernels``, by default liger-kernel's (:func:`liger_kernels`).
    Scoped to this model's module instances (see the module docstring for which qualify);
    :func:`unfuse_elementwise` undoes it. Returns the names of the fused modules and logs them;
    ``ValueError`` when none qualifies, when liger-kernel is missing, or when the MLP tiling, the
    RMSNorm recompute or compiled layers are already on (they wrap the forwards this replaces)."""
    inner = unwrap(model)
    if is_fused(inner):
        raise ValueError("the elementwise ops of this model are already fused; call unfuse_elementwise(model) first")
    _check_order(inner, "fuse_elementwise before them")
    kernels = kernels if kernels is not None else liger_kernels()
    fused: dict[str, list[str]] = {"norm": [], "mlp": [], "rope": []}
    modules = []
    # bound methods and module attributes only (no closure over a module): a deep copy of the model
    # then runs on its own weights
    for name, module in inner.named_modules():
        if "forward" in module.__dict__:
            continue  # another feature's forward (e.g. a mixer under SP): left as it is
        if rms_norm.is_llama_rms_norm(module):
            setattr(module, rms_norm.FUSED_NORM_ATTR, kernels.rms_norm_where_it_runs)
            module.forward = types.MethodType(_norm_forward, module)
            fused["norm"].append(name)
        elif is_llama_mlp(module):
            module._ulysses_sp_fused_kernels = kernels
            module.forward = types.MethodType(_mlp_forward, module)
            fused["mlp"].append(name)
        elif has_llama_rope(module):
            forward = type(module).forward
            torch_rope = _function(forward).__globals__[_ROPE]
            copy = _with_global(forward, _ROPE, _fused_rope(kernels, torch_rope))
            if copy is None:
                continue
            module.forward = types.MethodType(copy, module)
            fused["rope"].append(name)
        else:
            continue
        modules.append(module)
    if not modules:
        raise ValueError(
            f"{type(inner).__name__} has no Llama-style RMSNorm, SiLU-gated MLP or rotary embedding to fuse; "
            "leave the fused ops off for this model"
        )
    inner._ulysses_sp_fused = modules
    counts = (len(fused["norm"]), len(fused["mlp"]), len(fused["rope"]))
    logger.info("fused kernels on %s: %d RMSNorms, %d MLPs (SiLU * mul), %d RoPE", type(inner).__name__, *counts)
    return [name for names in fused.values() for name in names]


def unfuse_elementwise(model: torch.nn.Module):
    """Undo :func:`fuse_elementwise`: the modules' own forwards again; returns ``model``."""
    inner = unwrap(model)
    modules = getattr(inner, "_ulysses_sp_fused", None)
    if modules is None:
        raise ValueError("the elementwise ops of this model are not fused")
    _check_order(inner, "the fused ops after them: undo them first")
    for module in modules:
        del module.forward
        for attr in (rms_norm.FUSED_NORM_ATTR, "_ulysses_sp_fused_kernels"):
            module.__dict__.pop(attr, None)
    del inner._ulysses_sp_fused
    return model


def _check_order(inner: torch.nn.Module, remedy: str) -> None:
    wrapping = {
        "tile_mlp": is_mlp_tiled(inner),
        "enable_rms_norm_recompute": rms_norm.is_norm_recompute_enabled(inner),
        "compile_layers": is_compiled(inner),
    }
    if any(wrapping.values()):
        on = ", ".join(name for name, enabled in wrapping.items() if enabled)
        raise ValueError(f"{on} already wrap this model's forwards; call {remedy}")
