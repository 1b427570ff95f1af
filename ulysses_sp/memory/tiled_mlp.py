"""Tiled MLP: each decoder layer's MLP runs over tiles of the local tokens, so its [t, d_ff]
intermediates exist for one tile at a time instead of for all s local tokens.

Shape legend: B batch, s = S/P local tokens, T = B*s tokens, t tokens per tile, n tiles, d hidden
size, d_ff the MLP's intermediate size.

Forward: the tiles run without autograd and only the MLP input [B, s, d] is saved, or nothing new
when that input is the output of an RMSNorm recompute (rms_norm.py): the norm's input, which the
norm keeps anyway, and each tile of the MLP input is recomputed from it in the backward (one copy
of [B, s, d] less per layer; equal up to the rounding of the norm's row reduction). Backward: each
tile is run again with autograd and backpropagated at once (its intermediates are freed before the
next tile), writing its slice of the input gradient and accumulating the parameter gradients. The
gradients equal the untiled MLP's up to the summation order over tiles. Cost: one more MLP forward
per layer and step, less its last matmul where the MLP's output is a plain ``nn.Linear`` down
projection's (Llama-style MLPs): the backward needs that projection's input, not its output, so the
tile's rerun stops before it and its two gradient matmuls are done here (:func:`_rerun_to_down`).
The backward then runs 8 MLP matmuls per layer, one less than an untiled checkpointed MLP, whose
recomputation runs the down projection to save its input again. Under a non-reentrant activation
checkpoint the layer's recomputation stops
after the last tensor the backward saved (torch's early stop); :class:`_TileSource` saves what the
tiles are recomputed from in an op of its own, before the tiled forward, so the recomputation ends
there and never reruns the tiled forward, whose output no backward reads.
An untiled MLP keeps about 8 d_ff bytes per token in bf16 while it runs (gate, up, act, product):
112 KiB for Llama-3-8B, 14x the layer's checkpoint.

ZeRO-3 gathers a partitioned parameter at every call of its module, so every rank of the
partition group must run the same number of tiles, also when DP replicas hold sequences of
different lengths. The tile count is agreed once per forward of the model: a pre-hook on the
backbone (``model.base_model``) takes ceil(T / t) and, when the MLP parameters are ZeRO-3
partitioned and the ranks' token counts can differ (DP > 1, or a model without SP applied), the
maximum over the partition group (one all-reduce of a scalar). The MLPs of that forward and of its
recomputation in the backward all use it; ``torch.tensor_split`` gives a rank with fewer tokens
shorter (possibly empty) tiles.

Parameter gradients reach the engine once per backward, summed over the tiles: DDP, ZeRO 1/2 and
FSDP2 act on a parameter's gradient as it is accumulated (DDP fails on a second one), so the MLP's
trainable parameters are inputs of the autograd function, whose backward returns their gradients
summed over the tiles (one [d_ff, d]-sized buffer each, the size of the gradients themselves). ZeRO-3
partitioned parameters cannot be inputs (outside their module's call they are empty, so autograd
would reject full-size gradients); their gradients accumulate tile by tile and DeepSpeed's hooks
reduce them after the last tile only (``param.ds_grad_is_ready``).
"""

from __future__ import annotations

import inspect
import math
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from ..core import comm
from ..core.apply import applied_topology
from ..core.checks import check_int
from ..core.sharding import input_tokens
from ..core.wrappers import unwrap
from . import rms_norm


@dataclass
class _TileState:
    tile_tokens: int
    mlps: list[torch.nn.Module]
    priors: list  # each MLP's own instance forward before tiling (fused_ops.py), or None
    hook: torch.utils.hooks.RemovableHandle | None = None
    tiles: int | None = None  # agreed at the backbone's last forward


def is_mlp_tiled(model: torch.nn.Module) -> bool:
    return getattr(unwrap(model), "_ulysses_sp_tiled_mlp", None) is not None


def tile_mlp(model: torch.nn.Module, tile_tokens: int | None = None):
    """Run the MLP of every decoder layer of ``model`` over tiles of ``tile_tokens`` tokens (default:
    the hidden size d, as ALST: one tile's intermediates then take 8 d d_ff bytes in bf16, about the
    size of the MLP's weights). Scoped to this model's MLP instances; :func:`untile_mlp` undoes it. Returns
    ``model``. MoE blocks (modules with ``experts``) are left as they are. A PEFT model is tiled
    inside (core/wrappers.py): LoRA layers in the MLP run in each tile; tile after ``get_peft_model``,
    so that the adapters' dropout is seen (and refused)."""
    inner = unwrap(model)
    if is_mlp_tiled(inner):
        raise ValueError("the MLPs of this model are already tiled; call untile_mlp(model) first")
    config = inner.config.get_text_config(decoder=True)
    tile_tokens = tile_tokens if tile_tokens is not None else config.hidden_size
    check_int("tile_tokens", tile_tokens)
    backbone = inner.base_model
    mlps = [
        m.mlp
        for m in backbone.modules()
        if isinstance(getattr(m, "mlp", None), torch.nn.Module) and not hasattr(m.mlp, "experts")
    ]
    if not mlps or backbone is inner:
        raise ValueError(f"{type(inner).__name__} has no decoder layers with a dense `mlp` module to tile")
    for mlp in mlps:
        dropout = [n for n, d in mlp.named_modules() if isinstance(d, torch.nn.Dropout) and d.p > 0]
        if dropout:
            raise ValueError(
                f"{type(mlp).__name__} applies dropout ({', '.join(dropout)}); the tiled MLP reruns the forward "
                "in the backward without replaying the random state (a LoRA adapter in the MLP: lora_dropout=0, "
                "or leave the MLP's projections out of target_modules)"
            )
    state = _TileState(tile_tokens, mlps, [mlp.__dict__.get("forward") for mlp in mlps])
    state.hook = backbone.register_forward_pre_hook(_make_agree_hook(inner, state), with_kwargs=True)
    for mlp, prior in zip(mlps, state.priors):
        # each tile runs the MLP's forward as it was: its class's, or the fused one (fused_ops.py)
        if prior is None or (isinstance(prior, types.MethodType) and prior.__self__ is mlp):
            forward = type(mlp).forward if prior is None else prior.__func__  # (a deep copy rebinds it)
        else:
            forward = lambda _, h, prior=prior: prior(h)  # noqa: E731
        mlp.forward = types.MethodType(_make_tiled_forward(state, forward), mlp)
    inner._ulysses_sp_tiled_mlp = state
    return model


def untile_mlp(model: torch.nn.Module):
    """Undo :func:`tile_mlp`: the MLPs run their own forward again, the hook is removed."""
    inner = unwrap(model)
    state: _TileState | None = getattr(inner, "_ulysses_sp_tiled_mlp", None)
    if state is None:
        raise ValueError("the MLPs of this model are not tiled")
    state.hook.remove()
    for mlp, prior in zip(state.mlps, state.priors):
        del mlp.forward
        if prior is not None:
            mlp.forward = prior
    del inner._ulysses_sp_tiled_mlp
    return model


def _make_agree_hook(model: torch.nn.Module, state: _TileState):
    params = [p for mlp in state.mlps for p in mlp.parameters()]
    names = tuple(inspect.signature(model.base_model.forward).parameters)

    def pre_hook(module, args, kwargs):
        x = input_tokens({**dict(zip(names, args)), **kwargs}, "the model call")
        tiles = max(1, math.ceil(x.shape[0] * x.shape[1] / state.tile_tokens))
        state.tiles = _agreed_tiles(model, params, tiles, x.device)

    return pre_hook


def _agreed_tiles(model: torch.nn.Module, params: list[torch.nn.Parameter], tiles: int, device) -> int:
    """``tiles``, or its maximum over the ZeRO-3 partition group where the ranks' counts can differ."""
    group = next((p.ds_process_group for p in params if hasattr(p, "ds_process_group")), None)
    if group is None:
        return tiles
    topology = applied_topology(model)
    if topology is not None and topology.dp_size == 1:  # one SP group: every rank holds S/P tokens of the same rows
        return tiles
    return int(comm.all_reduce(torch.tensor(tiles, device=device), group, op="max"))


def _make_tiled_forward(state: _TileState, forward):
    def tiled_forward(self, x: torch.Tensor) -> torch.Tensor:
        tiles = state.tiles if state.tiles is not None else max(1, math.ceil(x[..., 0].numel() / state.tile_tokens))
        if torch.compiler.is_compiling():
            return _checkpointed_tiles(lambda h: forward(self, h), x, tiles)
        params = [p for p in self.parameters() if p.requires_grad]
        viewed = _TileSource.apply(x)  # the same values, after saving the tiles' source (module docstring)
        source = viewed.grad_fn  # None where nothing before the MLP requires grad: TiledMLP saves it then
        x = x if source is None else viewed
        run = lambda h: forward(self, h)  # noqa: E731
        if any(hasattr(p, "ds_id") for p in params):  # ZeRO-3 partitioned (module docstring)
            # no down-projection skip: its weight is gathered inside its own call only
            return TiledMLP.apply(x, source, MLPCall(run), tiles, params)
        return TiledMLP.apply(x, source, MLPCall(run, _plain_down_projection(self)), tiles, [], *params)

    return tiled_forward


@dataclass(frozen=True)
class MLPCall:
    """What :class:`TiledMLP` runs: ``run`` maps [1, t, d] -> [1, t, d_out] token-wise; ``down`` is
    its plain down projection (:func:`_plain_down_projection`) or None."""

    run: Callable[[torch.Tensor], torch.Tensor]
    down: torch.nn.Linear | None = None


def _plain_down_projection(mlp: torch.nn.Module) -> torch.nn.Linear | None:
    """``mlp.down_proj`` where the backward may compute its gradients itself (:func:`_rerun_to_down`):
    a plain ``nn.Linear`` that nothing hooks or overrides, so its call is exactly ``F.linear``. Whether
    the MLP returns its output unchanged is checked on every forward (:meth:`TiledMLP.forward`)."""
    down = getattr(mlp, "down_proj", None)
    if type(down) is not torch.nn.Linear or "forward" in down.__dict__:
        return None
    hooks = (down._forward_hooks, down._forward_pre_hooks, torch.nn.modules.module._global_forward_hooks)
    return None if any(hooks) or torch.nn.modules.module._global_forward_pre_hooks else down


def _rerun_to_down(run, down: torch.nn.Linear, tile: torch.Tensor) -> torch.Tensor:
    """The MLP on ``tile`` [1, t, d] up to its down projection: that projection's input [1, t, d_ff],
    with autograd. The projection itself is not computed: its call returns an uninitialised
    placeholder, which no one reads (the forward checked that the MLP returns the projection's output
    as it is)."""
    seen = []

    def capture(h):
        seen.append(h)
        return h.new_empty(*h.shape[:-1], down.out_features)  # [1, t, d_out], never read

    down.forward = capture
    try:
        run(tile)
    finally:
        del down.forward
    assert len(seen) == 1, f"the MLP called its down projection {len(seen)} times in one forward, checked once"
    return seen[0]


def _checkpointed_tiles(mlp, x: torch.Tensor, tiles: int) -> torch.Tensor:
    """The tiled MLP as the compiler sees it: one checkpoint per tile. Dynamo cannot trace
    :class:`TiledMLP`'s backward (it calls ``torch.autograd.grad``); a checkpoint per tile gives the
    compiled graph the same schedule: each tile's [t, d_ff] intermediates are recomputed in the
    backward and freed before the next tile. x [..., d] -> [..., d_out]."""
    flat = x.reshape(-1, x.shape[-1])  # [T, d]
    outs = [
        checkpoint(mlp, tile.unsqueeze(0), use_reentrant=False).squeeze(0)  # [t, d_out]
        for tile in flat.tensor_split(tiles)
    ]
    return torch.cat(outs).view(*x.shape[:-1], outs[0].shape[-1])


def _save_source(ctx, x: torch.Tensor) -> None:
    """Save on ``ctx`` what the tiles of x [..., d] are recomputed from: x, or, where x is an RMSNorm
    recompute's output, the norm's input and weight (kept by the norm anyway: one [..., d] less)."""
    source = rms_norm.norm_source(x)
    if source is None:
        ctx.save_for_backward(x)
    else:
        ctx.save_for_backward(source.x, source.weight)
        ctx.eps, ctx.norm_kernel = source.eps, source.kernel


def _tile_inputs(ctx, tiles: int, d: int):
    """The tiles [t, d] of the MLP input from what :func:`_save_source` saved on ``ctx``."""
    saved = ctx.saved_tensors
    if len(saved) == 1:
        return saved[0].detach().reshape(-1, d).tensor_split(tiles)
    norm_x, weight = saved
    return (
        rms_norm.recompute_output(nx, weight, ctx.eps, ctx.norm_kernel)
        for nx in norm_x.detach().reshape(-1, d).tensor_split(tiles)
    )


class _TileSource(torch.autograd.Function):
    """x [..., d] -> the same values (a view), saving the tiles' source (:func:`_save_source`) for
    :class:`TiledMLP`'s backward. The layer's last op that saves a tensor, so that a checkpoint's
    recomputation stops here (module docstring); its own backward passes the gradient through."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        _save_source(ctx, x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad


class TiledMLP(torch.autograd.Function):
    """``mlp(x)`` over ``tiles`` token tiles, recomputed tile by tile in the backward.

    x [..., d] -> [..., d_out]; ``source``: x's :class:`_TileSource` node, whose saved tensors the
    backward reads (None: saved here); ``mlp`` an :class:`MLPCall`. ``zero3_params``:
    ZeRO-3 partitioned parameters it uses (their ``ds_grad_is_ready`` flags DeepSpeed's hooks for the
    last tile only); ``params``: the other trainable ones, whose gradients the backward returns,
    summed over the tiles (module docstring).
    """

    @staticmethod
    def forward(ctx, x, source, mlp, tiles: int, zero3_params: list[torch.nn.Parameter], *params: torch.nn.Parameter):
        ctx.mlp, ctx.tiles, ctx.zero3_params, ctx.params = mlp, tiles, zero3_params, params
        ctx.autocast = _autocast_state(x.device.type)
        ctx.source = source
        if source is None:
            _save_source(ctx, x)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        flat = x.reshape(-1, x.shape[-1])  # [T, d]
        downs = []  # this tile's down-projection output and its version (the hook's record)
        record = lambda module, args, y: downs.append((y, y._version))  # noqa: E731
        hook = None if mlp.down is None else mlp.down.register_forward_hook(record)
        out, start, unchanged = None, 0, hook is not None
        try:
            for tile in flat.tensor_split(tiles):  # [t, d]; some may be empty
                y = mlp.run(tile.unsqueeze(0))  # [1, t, d_out]
                # the skip needs the MLP to return its one down-projection output as it is
                unchanged = unchanged and len(downs) == 1 and downs[0][0] is y and downs[0][1] == y._version
                downs.clear()  # no tile's output outlives its copy into ``out``
                if out is None:
                    out = y.new_empty(flat.shape[0], y.shape[-1])  # [T, d_out]
                out[start : start + tile.shape[0]] = y.squeeze(0)
                start += tile.shape[0]
        finally:
            if hook is not None:
                hook.remove()
        ctx.down = mlp.down if unchanged else None
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        d = ctx.x_shape[-1]
        inputs = _tile_inputs(ctx.source if ctx.source is not None else ctx, ctx.tiles, d)  # [t, d] each
        grads = grad_out.reshape(-1, grad_out.shape[-1])  # [T, d_out]
        # allocated in x's shape and written through a flat view: a returned view keeps a second
        # reference to the storage, and autograd adds a later gradient of x (the attention's, where
        # both read one norm's output) out of place, into one more [T, d] tensor
        grad_x = grads.new_empty(ctx.x_shape, dtype=ctx.x_dtype) if ctx.needs_input_grad[0] else None  # [..., d]
        grad_rows = None if grad_x is None else grad_x.view(-1, d)  # [T, d]
        device_type, enabled, dtype = ctx.autocast
        param_grads = [None] * len(ctx.params)  # each the parameter's shape, summed over the tiles
        down = _down_in(ctx.down, ctx.params)
        start = 0
        for i, (tile, grad) in enumerate(zip(inputs, grads.tensor_split(ctx.tiles))):
            for p in ctx.zero3_params:
                p.ds_grad_is_ready = i == ctx.tiles - 1  # DeepSpeed reduces after the last tile only
            tile = tile.detach().requires_grad_(grad_x is not None)
            with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
                if down is None:
                    y = ctx.mlp.run(tile.unsqueeze(0)).squeeze(0)  # [t, d_out]
                else:
                    y = _rerun_to_down(ctx.mlp.run, ctx.down, tile.unsqueeze(0)).squeeze(0)  # [t, d_ff]
                    grad = _down_backward(ctx.down, y, grad, down, param_grads)  # [t, d_ff]
            if ctx.zero3_params:  # into .grad of the tile and of the parameters, through DeepSpeed's hooks
                torch.autograd.backward(y, grad)
                tile_grad = tile.grad
            else:
                wrt = ([tile] if grad_x is not None else []) + list(ctx.params)
                found = list(torch.autograd.grad(y, wrt, grad, allow_unused=True)) if wrt else []
                tile_grad = found.pop(0) if grad_x is not None else None
                for j, g in enumerate(found):
                    if g is not None:
                        param_grads[j] = g if param_grads[j] is None else param_grads[j].add_(g)
            if grad_x is not None:
                grad_rows[start : start + tile.shape[0]] = tile_grad
            start += tile.shape[0]
        return grad_x, None, None, None, None, *param_grads


def _down_in(down: torch.nn.Linear | None, params: tuple) -> dict[str, int | None] | None:
    """Where the down projection's weight and bias sit in ``params`` (None: frozen, no gradient), or
    None where its gradients cannot be returned from there (a trainable one not among them)."""
    if down is None:
        return None
    found = {}
    for name in ("weight", "bias"):
        p = getattr(down, name)
        found[name] = next((j for j, q in enumerate(params) if q is p), None)
        if p is not None and p.requires_grad and found[name] is None:
            return None
    return found


def _down_backward(down: torch.nn.Linear, h: torch.Tensor, grad: torch.Tensor, index: dict, param_grads: list):
    """Backward of ``F.linear(h, W, b)`` as autograd runs it (in h's dtype, which autocast gave the
    forward's cast of W): the gradients of W and b summed into ``param_grads``; returns h's.
    h [t, d_ff], grad [t, d_out] -> [t, d_ff]."""
    with torch.no_grad():
        grad = grad.to(h.dtype)
        sums = {"weight": lambda: grad.t() @ h, "bias": lambda: grad.sum(0)}  # [d_out, d_ff], [d_out]
        for name, compute in sums.items():
            j = index[name]
            if j is not None:
                g = compute().to(getattr(down, name).dtype)
                param_grads[j] = g if param_grads[j] is None else param_grads[j].add_(g)
        return grad @ down.weight.to(h.dtype)  # [t, d_out] @ [d_out, d_ff]


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
