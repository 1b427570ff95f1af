"""What a model call on the local shard needs besides the shard: filled in by apply's pre-hook.

Shape legend: B batch, s = S/P local tokens, S full sequence, E embedding width.

The backbone's forward pre-hook (apply.py) passes every call through :func:`complete_kwargs`:
global position ids when absent, and the SequenceInfo of the full sequence (from ``shard_batch``, or
gathered once per step here). Masks given to the model: a 2-D padding mask of the shard is folded
into that info; a full-sequence [B, S, S] mask becomes [B, 1, S, S], which transformers hands to
attention untouched, like a 4-D mask or a flex BlockMask.
"""

from __future__ import annotations

import torch

from . import comm
from .layout import check_local_length, local_index, ring_size_of, to_sequence_order
from .sequence_info import SEQ_INFO_KWARG, SequenceInfo, build_sequence_info, check_non_negative
from .sharding import input_tokens
from .topology import SPTopology


def complete_kwargs(kwargs: dict, topology: SPTopology) -> dict:
    """Fill in what attention needs for a call on the local shard (see module docstring)."""
    P, rank = topology.sp_size, topology.sp_rank
    tokens = input_tokens(kwargs, "the model call")
    B, s = tokens.shape[:2]
    if kwargs.get("past_key_values") is not None or kwargs.get("use_cache"):
        raise ValueError(
            "ulysses_sp shards the sequence for training/scoring; KV caches (use_cache=True, "
            "past_key_values) are not supported. Pass use_cache=False"
        )
    kwargs["use_cache"] = False
    check_local_length(s, P, ring_size_of(topology))
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        position_ids = local_index(s * P, P, ring_size_of(topology), rank, tokens.device).expand(B, s)  # [B, s]
        kwargs["position_ids"] = position_ids
    elif position_ids.shape[-1] != s or position_ids.dim() not in (2, 3):
        raise ValueError(
            f"position_ids must be the local shard's global positions, [B, {s}] (or [3, B, {s}] for mRoPE), "
            f"got {list(position_ids.shape)}"
        )
    elif position_ids.is_floating_point() or position_ids.is_complex() or position_ids.dtype == torch.bool:
        raise ValueError(
            f"position_ids must be an integer tensor (torch.long), got {position_ids.dtype}; convert them with .long()"
        )
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        if kwargs.get(key) is not None:  # transformers' flash path would read them; ours reads the SequenceInfo
            raise ValueError(
                f"{key} was passed to the model; under sequence parallelism give the full batch with "
                f"{key} to ulysses_sp.shard_batch, which folds the document layout into the SequenceInfo"
            )
    padding = _custom_or_padding_mask(kwargs, B, s, P)  # [B, s] or None
    info = kwargs.get(SEQ_INFO_KWARG)
    if info is None:
        kwargs[SEQ_INFO_KWARG] = gather_sequence_info(
            position_ids.expand(*position_ids.shape[:-2], B, s), padding, topology
        )
    elif not isinstance(info, SequenceInfo) or info.seq_len != s * P:
        raise ValueError(
            f"{SEQ_INFO_KWARG} must be the SequenceInfo of a {s * P}-token sequence "
            f"({P} ranks x {s} local tokens), from ulysses_sp.shard_batch"
        )
    elif padding is not None:
        raise ValueError(
            "a 2-D attention_mask was passed together with the step's SequenceInfo, which already "
            "describes the padding; give the full [B, S] mask to ulysses_sp.shard_batch instead"
        )
    return kwargs


def _custom_or_padding_mask(kwargs: dict, B: int, s: int, P: int) -> torch.Tensor | None:
    """Take a 2-D padding mask [B, s] out of ``kwargs`` (returned, for the SequenceInfo); leave a
    full-sequence mask for attention: [B, S, S] becomes [B, 1, S, S] (transformers passes only 4-D
    masks and BlockMasks through when no mask builder exists for the attention name)."""
    mask = kwargs.get("attention_mask")
    if mask is None or not isinstance(mask, torch.Tensor):
        return None  # None, or a flex BlockMask, which attention checks
    if mask.dim() == 2:
        if tuple(mask.shape) != (B, s):
            raise ValueError(
                f"a 2-D attention_mask must be the local shard's, [{B}, {s}], got {list(mask.shape)}; "
                "give a full [B, S] mask to ulysses_sp.shard_batch instead"
            )
        kwargs["attention_mask"] = None  # folded into the SequenceInfo
        return mask
    if mask.dim() == 3:
        if mask.is_floating_point():
            raise ValueError(
                "a 3-D float attention_mask is ambiguous (keep-mask or additive?); pass a bool "
                f"[B, {s * P}, {s * P}] (True = attend) or an additive float [B, 1, {s * P}, {s * P}]"
            )
        kwargs["attention_mask"] = mask.unsqueeze(1).to(torch.bool)  # [B, 1, S, S], nonzero = attend
    elif mask.dim() != 4:
        raise ValueError(
            f"attention_mask must be 2-D [B, S/P] (padding), or the full sequence's [B, S, S] or "
            f"[B, 1, S, S]; got {list(mask.shape)}"
        )
    return None


@torch.compiler.disable(
    reason="gathers the shards' position ids and inspects them on the host, once per step; "
    "pass ulysses_sp_info from shard_batch to compile the model without this break"
)
def gather_sequence_info(position_ids: torch.Tensor, mask: torch.Tensor | None, topology: SPTopology) -> SequenceInfo:
    """Gather the shards' position ids (and 2-D mask) once and describe the full sequence.

    Every check here sees gathered values, so every rank of the SP group raises the same error.
    """
    if position_ids.dim() == 3:
        position_ids = position_ids[0]  # [B, s] temporal row of mRoPE ids
    if topology.sp_size > 1:
        _check_same_local_shape(position_ids, topology)
        position_ids = comm.all_gather(position_ids.contiguous(), topology.sp_group, dim=-1)  # [B, S] layout order
        position_ids = to_sequence_order(position_ids, 1, ring_size_of(topology))  # [B, S]
        if mask is not None:
            mask = comm.all_gather(mask.to(torch.int32), topology.sp_group, dim=-1)  # [B, S] layout order
            mask = to_sequence_order(mask, 1, ring_size_of(topology))  # [B, S]
    check_non_negative(position_ids)  # on the gathered ids: the same verdict on every rank
    return build_sequence_info(position_ids, mask)


def _check_same_local_shape(position_ids: torch.Tensor, topology: SPTopology) -> None:
    """One tiny gather of [B, s] per rank: shards of unequal size would make the next gathers fail or hang."""
    local = torch.tensor([list(position_ids.shape)], device=position_ids.device)  # [1, 2]
    shapes = comm.all_gather(local, topology.sp_group)  # [P, 2]
    if bool((shapes != shapes[0]).any()):
        seen = ", ".join(f"rank {r}: [B={b}, s={n}]" for r, (b, n) in zip(topology.sp_ranks(), shapes.tolist()))
        raise ValueError(
            f"the SP group's ranks were called with local shards of different shapes ({seen}); every rank must hold "
            f"an equal slice of the same batch: cut the full batch with ulysses_sp.shard_batch, which pads the "
            f"sequence to a multiple of sp_size={topology.sp_size}"
        )
