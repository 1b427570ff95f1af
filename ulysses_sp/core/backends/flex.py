"""flex_attention: the rule of masks.py as a block-sparse BlockMask (never dense), a user's mask
as a BlockMask or a score bias, softcapping, and attention sinks through its log-sum-exp.

Shape legend: B batch, S full sequence, n heads on this rank (nq query), H head dim (Hv for values).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .. import masks
from .spec import AttnSpec

#: compilations dynamo may keep for each of our compiled flex functions. Its default (8 per code
#: object) is shared by every variant: each mask kind (none, a plain or per-row rule, each window),
#: with and without gradients, of the dense path and the ring's pairs, and each new length. Past it
#: dynamo runs the function eagerly, and eager flex materialises the [S, S] scores and eager
#: create_block_mask a dense [B, H, S, S] mask: slow, or out of memory at long lengths (seen: the
#: ring's flex fell back after three mask kinds with and without gradients and a second chunk length).
RECOMPILE_LIMIT = 64


def compiled(fn, *, dynamic: bool | None, backend: str = "inductor"):
    """``torch.compile(fn)`` called with dynamo's recompile limit at :data:`RECOMPILE_LIMIT`."""
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    fn_compiled = torch.compile(fn, dynamic=dynamic, backend=backend)

    def call(*args, **kwargs):
        with dynamo_config.patch(**{name: max(RECOMPILE_LIMIT, getattr(dynamo_config, name))}):
            return fn_compiled(*args, **kwargs)

    return call


@lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return compiled(flex_attention, dynamic=False)


@lru_cache(maxsize=1)
def _compiled_create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    return compiled(create_block_mask, dynamic=None)


def block_mask(mask_mod, batch: int | None, heads: int | None, Lq: int, Lk: int, device: torch.device):
    """A BlockMask of ``mask_mod`` over [batch|1, heads|1, Lq, Lk]. Eager ``create_block_mask``
    evaluates every (q, k) pair into one [batch, heads, S, S] tensor, so on CUDA it runs compiled
    (torch's advice), fusing that evaluation into the per-block reduction; inside a compiled model it
    is traced like any other op."""
    from torch.nn.attention.flex_attention import create_block_mask

    eager = device.type == "cpu" or torch.compiler.is_compiling()
    build = create_block_mask if eager else _compiled_create_block_mask()
    return build(mask_mod, batch, heads, Lq, Lk, device=device)


def _flex_custom(mask, B: int, n: int, S: int, device):
    """A user's full-sequence mask for flex -> (BlockMask or None, additive bias [B, n, S, S] or None).

    A BlockMask is used as it is; a bool [B|1, n|1, S, S] mask (True = attend) becomes a BlockMask
    of its True entries; a float one is added to the scores (transformers' additive convention).
    """
    from torch.nn.attention.flex_attention import BlockMask

    if isinstance(mask, BlockMask):
        return mask, None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"a {type(mask).__name__} attention mask is neither a tensor nor a flex BlockMask")
    if mask.dtype == torch.bool:
        allowed = mask.to(device).expand(B, n, S, S)  # a view: flex reads it at every (b, h) it computes

        def keep(b, h, q, k):
            return allowed[b, h, q, k]

        return block_mask(keep, mask.shape[0], mask.shape[1], S, S, device), None
    return None, mask.to(device).expand(B, n, S, S)  # [B, n, S, S] view, nothing copied


def flex_function(device: torch.device):
    """flex_attention as it runs on ``device``: eager on CPU and inside a compiled model, compiled
    on its own on CUDA (eager flex is a dense reference implementation there)."""
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention if (device.type == "cpu" or torch.compiler.is_compiling()) else _compiled_flex()


def check_head_dims(q: torch.Tensor, v: torch.Tensor) -> None:
    """ValueError when flex's compiled CUDA kernel cannot take these head dims (q/k: q's last dim, v's)."""
    if q.is_cuda and min(q.shape[-1], v.shape[-1]) < 16:
        raise ValueError(
            f"flex_attention's compiled CUDA kernel needs head dims >= 16; this model's are "
            f"{q.shape[-1]} (q/k) and {v.shape[-1]} (v). Use attn_implementation='sdpa' or 'eager'"
        )


def attend(q, k, v, spec: AttnSpec) -> torch.Tensor:
    if spec.dropout > 0:
        raise ValueError("flex_attention has no attention dropout; set attention_dropout=0 or use sdpa")
    check_head_dims(q, v)
    B, S, n = q.shape[:3]
    bias = None
    if spec.custom_mask is not None:
        mask, bias = _flex_custom(spec.custom_mask, B, n, S, q.device)
    else:
        key = ("flex", spec.causal, spec.window, spec.chunk, str(q.device))
        if key not in spec.info.cache:
            batch = None if spec.info.is_plain else B
            spec.info.cache[key] = block_mask(
                masks.mask_mod(spec.info, spec.causal, spec.window, spec.chunk), batch, None, S, S, q.device
            )
        mask = spec.info.cache[key]
    score_mod = None
    if spec.softcap is not None or bias is not None:
        cap = spec.softcap

        def score_mod(score, b, h, qi, ki):
            if cap is not None:
                score = torch.tanh(score / cap) * cap
            return score if bias is None else score + bias[b, h, qi, ki]

    out = flex_function(q.device)(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),  # [B, n, S, H]
        score_mod=score_mod,
        block_mask=mask,
        scale=spec.scale,
        enable_gqa=q.shape[2] != k.shape[2],
        **(flex_lse_kwargs() if spec.sinks is not None else {}),
    )  # [B, nq, S, Hv]
    if spec.sinks is not None:
        out, aux = out
        out = apply_sinks(out, getattr(aux, "lse", aux), spec.sinks)
    return out.transpose(1, 2)  # [B, S, nq, Hv]


def flex_lse_kwargs() -> dict:
    """Ask flex for its log-sum-exp: ``return_aux`` since torch 2.9, ``return_lse`` before."""
    from torch.nn.attention import flex_attention as fa

    return {"return_aux": fa.AuxRequest(lse=True)} if hasattr(fa, "AuxRequest") else {"return_lse": True}


def apply_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Attention without sinks -> with them: out [B, nq, S, Hv], lse [B, nq, S] (natural log of each
    query's softmax denominator), sinks [nq]. A sink adds exp(sink) to the denominator only, so the
    output scales by exp(lse) / (exp(lse) + exp(sink)) = sigmoid(lse - sink); a query that sees no
    key (lse = -inf) stays 0. Differentiable in out, lse and sinks."""
    scale = torch.sigmoid(lse.float() - sinks.float().view(1, -1, 1))  # [B, nq, S]
    return (out.float() * scale.unsqueeze(-1)).to(out.dtype)
