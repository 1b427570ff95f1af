"""Vision-language models under SP: the sample is whole up to the language model, sharded inside it.

Shape legend: B batch, S full (padded) sequence, s = S/P local tokens, P = sp_size, D model width,
K rows of multi-axis (mRoPE) position ids (3, or 4 with a text row first).

Every rank of an SP group calls the model with the same full sample (``input_ids`` [B, S],
``pixel_values``, ``image_grid_thw``...). The vision tower runs on every rank over the whole sample,
the model merges the image features into the full ``inputs_embeds`` and computes the 3-D mRoPE
position ids of the full sequence, exactly as without SP. A forward pre-hook on the inner language
model then keeps this rank's tokens ``[r*s, (r+1)*s)`` of ``inputs_embeds`` and ``position_ids`` and
hands attention the step's SequenceInfo of the full sequence; the model's logits are the shard's.
Each rank's shard back-propagates into the shared vision tower: the sum of those gradients over the
SP group is the non-SP gradient, as for every other parameter.
"""

from __future__ import annotations

import torch

from .sequence_info import SEQ_INFO_KWARG, build_sequence_info

#: model types whose language model the hook knows: (composite model) -> its ``model.language_model``
SUPPORTED_VLMS = ("qwen2_5_vl", "qwen3_vl")


def language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The text decoder inside a supported VLM (``model.model.language_model``)."""
    return model.model.language_model


def check_supported(model: torch.nn.Module) -> None:
    """ValueError unless ``model`` is a VLM whose layout the hook knows."""
    model_type = getattr(model.config, "model_type", None)
    inner = getattr(getattr(model, "model", None), "language_model", None)
    if model_type not in SUPPORTED_VLMS or inner is None:
        raise ValueError(
            f"{type(model).__name__} is a composite (e.g. multimodal) model of type {model_type!r}; ulysses_sp "
            f"supports the vision-language models {list(SUPPORTED_VLMS)} and decoder-only language models "
            "(docs/vlm.md says how another VLM is added)"
        )


def shard_language_inputs(kwargs: dict, topology) -> dict:
    """The language model's keyword arguments for the full sequence -> this rank's shard (see module
    docstring): ``inputs_embeds`` [B, S, D] -> [B, s, D], ``position_ids`` [K, B, S] -> [K, B, s], a 2-D
    padding mask [B, S] folded into the SequenceInfo of the full sequence."""
    P, rank = topology.sp_size, topology.sp_rank
    embeds, positions = kwargs.get("inputs_embeds"), kwargs.get("position_ids")
    if embeds is None or positions is None:
        raise ValueError(
            "under sequence parallelism a vision-language model must be called with input_ids of the full "
            "sample (and its pixel_values / image_grid_thw), so it computes the full sequence's embeddings and "
            "mRoPE position ids before ulysses_sp shards them"
        )
    if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None or kwargs.get("use_cache"):
        raise ValueError("ulysses_sp shards the sequence for training; pass use_cache=False (no KV cache)")
    B, S = embeds.shape[:2]
    if S % P:
        raise ValueError(
            f"the sample has {S} tokens, not a multiple of sp_size={P}: pad input_ids (and labels with -100) "
            f"to {-(-S // P) * P} tokens (padding at the end of the row)"
        )
    mask = kwargs.get("attention_mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
        raise ValueError("a vision-language model under SP takes a 2-D padding attention_mask [B, S] only")
    s = S // P
    # the sample is one document per row (the temporal mRoPE row repeats inside images, so it cannot
    # mark packed documents): only padding is described
    info = build_sequence_info(None, mask, batch=B, seq_len=S)
    kwargs.update(
        inputs_embeds=embeds.narrow(1, rank * s, s),  # [B, s, D]
        position_ids=positions.narrow(-1, rank * s, s),  # [K, B, s]
        attention_mask=None,
        use_cache=False,
    )
    _shard_deepstack(kwargs, rank * s, s)
    kwargs[SEQ_INFO_KWARG] = info
    return kwargs


def _shard_deepstack(kwargs: dict, start: int, s: int) -> None:
    """Qwen3-VL adds vision features to the first layers' hidden states at the image tokens:
    ``visual_pos_masks`` [B, S] -> [B, s], and of each ``deepstack_visual_embeds`` [V, D] (one row per
    visual token, in row-major order over [B, S]) the rows of this shard's visual tokens."""
    mask = kwargs.get("visual_pos_masks")
    if mask is None:
        return
    mine = torch.zeros_like(mask)
    mine[:, start : start + s] = mask[:, start : start + s]  # [B, S]: this shard's visual tokens
    keep = mine[mask]  # [V] bool over the visual tokens, in their order
    kwargs["visual_pos_masks"] = mask[:, start : start + s]  # [B, s]
    embeds = kwargs.get("deepstack_visual_embeds")
    if embeds is not None:
        kwargs["deepstack_visual_embeds"] = [e[keep] for e in embeds]  # [V_local, D] each
