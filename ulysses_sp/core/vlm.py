"""Vision-language models under SP: the sample is whole up to the language model, sharded inside it.

Shape legend: B batch, S full (padded) sequence, s = S/P local tokens, P = sp_size, D model width,
K rows of multi-axis (mRoPE) position ids (3, or 4 with a text row first), V visual tokens.

Every rank of an SP group calls the model with the same full sample (``input_ids`` [B, S],
``pixel_values``, ``image_grid_thw``...; ``shard_batch(..., vlm=True)`` keeps them whole). The vision
tower runs on every rank over the whole sample, the model merges the image features into the full
``inputs_embeds`` and computes the 3-D mRoPE position ids of the full sequence, exactly as without
SP. A forward pre-hook on the inner language model then keeps this rank's tokens ``[r*s, (r+1)*s)``
of ``inputs_embeds`` and ``position_ids`` and hands attention the step's SequenceInfo of the full
sequence; the model's logits are the shard's. Each rank's shard back-propagates into the shared
vision tower: the sum of those gradients over the SP group is the non-SP gradient, as for every
other parameter.

Packed rows (several documents per row, described by the SequenceInfo from ``shard_batch``): the
model's own mRoPE index (``get_rope_index``) numbers a row as one sequence. A second pre-hook, on the
composite's inner model, computes the positions of each document alone with that same function (the
document's tokens and its images' grid rows) and passes them, so every document gets the positions
it has when run by itself; attention stays inside documents through the SequenceInfo.
"""

from __future__ import annotations

import inspect

import torch

from .sequence_info import SEQ_INFO_KWARG, SequenceInfo, build_sequence_info

#: a VLM's image/video inputs (a row per patch, per image / video, or per video's seconds per grid step):
#: whole on every rank (the vision tower runs on the full sample), never sliced; batched and packed by
#: concatenation along dim 0, in the order of the samples' visual tokens
IMAGE_KEYS = ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw", "second_per_grid_ts")
#: grid rows -> (the config's token id of that kind, per-item tensors that follow the grid's rows)
_GRIDS = {"image_grid_thw": ("image_token_id", ()), "video_grid_thw": ("video_token_id", ("second_per_grid_ts",))}

#: model types whose language model the hook knows: (composite model) -> its ``model.language_model``
SUPPORTED_VLMS = ("qwen2_5_vl", "qwen3_vl")


def language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The text decoder inside a supported VLM (``model.model.language_model``)."""
    return model.model.language_model


def check_supported(model: torch.nn.Module, ring_size: int = 1) -> None:
    """ValueError unless ``model`` is a VLM whose layout the hook knows (and no ring: the hook cuts
    contiguous shards)."""
    model_type = getattr(model.config, "model_type", None)
    inner = getattr(getattr(model, "model", None), "language_model", None)
    if model_type not in SUPPORTED_VLMS or inner is None:
        raise ValueError(
            f"{type(model).__name__} is a composite (e.g. multimodal) model of type {model_type!r}; ulysses_sp "
            f"supports the vision-language models {list(SUPPORTED_VLMS)} and decoder-only language models "
            "(docs/vlm.md says how another VLM is added)"
        )
    check_no_ring(ring_size)


def check_no_ring(ring_size: int) -> None:
    if ring_size > 1:
        raise ValueError(
            f"a vision-language model's language model is sharded contiguously; ring attention (ring_size="
            f"{ring_size}) is not supported for it: use ring_size=1"
        )


def check_vlm_batch(batch: dict, vlm: bool, ring_size: int) -> None:
    """shard_batch's checks: images only with ``vlm=True``; a VLM's batch without a ring, 2-D mask only."""
    images = sorted(k for k in IMAGE_KEYS if batch.get(k) is not None)
    if images and not vlm:
        raise ValueError(
            f"the batch has {images}: a vision-language model's sample, which the model takes whole on every "
            "rank; pass vlm=True (shard_batch, SPDataLoader) so that only the labels are sliced"
        )
    if not vlm:
        return
    check_no_ring(ring_size)
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        raise ValueError(
            f"a vision-language model under SP takes a 2-D padding attention_mask [B, S] only, got {list(mask.shape)}"
        )


def text_only_labels(batch: dict, ignore_index: int) -> dict:
    """``batch`` with its ``labels`` [B, S] ignored at the visual tokens (``mm_token_type_ids`` [B, S]
    nonzero): their ids are placeholders the vision features replace, never text to predict."""
    labels, kinds = batch.get("labels"), batch.get("mm_token_type_ids")
    if labels is None or kinds is None or tuple(kinds.shape) != tuple(labels.shape):
        return batch
    return {**batch, "labels": labels.masked_fill(kinds != 0, ignore_index)}


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
    if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (B, S)):
        raise ValueError(
            f"a vision-language model under SP takes a 2-D padding attention_mask [B, S] = [{B}, {S}] only"
        )
    s = S // P
    info = kwargs.get(SEQ_INFO_KWARG)
    if info is None:  # one document per row: only padding to describe
        info = build_sequence_info(None, mask, batch=B, seq_len=S)
    elif not isinstance(info, SequenceInfo) or info.seq_len != S:
        raise ValueError(
            f"{SEQ_INFO_KWARG} must describe the {S}-token sample the vision-language model was called with "
            f"(got {getattr(info, 'seq_len', info)!r}): call it with the whole sample from "
            "ulysses_sp.shard_batch(batch, topology, vlm=True)"
        )
    kwargs.update(
        inputs_embeds=embeds.narrow(1, rank * s, s),  # [B, s, D]
        position_ids=positions.narrow(-1, rank * s, s),  # [K, B, s]
        attention_mask=None,
        use_cache=False,
    )
    _shard_deepstack(kwargs, rank * s, s)
    kwargs[SEQ_INFO_KWARG] = info
    return kwargs


def make_document_positions_hook(model: torch.nn.Module):
    """A forward pre-hook (with kwargs) for the composite's inner model ``model``: packed rows get the
    mRoPE positions of each document alone (module docstring)."""
    params = tuple(inspect.signature(model.forward).parameters)

    def hook(module, args, kwargs):
        kwargs = {**dict(zip(params, args)), **kwargs}
        info = kwargs.get(SEQ_INFO_KWARG)
        packed = info is not None and info.doc_ids is not None and bool(info.doc_ids[:, -1].any())
        if packed and kwargs.get("position_ids") is None:
            kwargs["position_ids"] = document_positions(module, kwargs, info.doc_ids)  # [3, B, S]
        return (), kwargs

    return hook


def document_positions(model: torch.nn.Module, kwargs: dict, doc_ids: torch.Tensor) -> torch.Tensor:
    """[3, B, S] mRoPE positions, each document's computed alone by ``model.get_rope_index`` from its
    tokens, its images' and videos' grid rows (and Qwen2.5-VL's ``second_per_grid_ts``) and its part of
    a 2-D attention mask. ``doc_ids`` [B, S]: documents numbered from 0 in each row."""
    ids = kwargs.get("input_ids")
    if ids is None:
        raise ValueError(
            "a packed vision-language batch needs input_ids: the mRoPE positions of each document are computed "
            "from its tokens (or pass position_ids [3, B, S] computed per document)"
        )
    takes = inspect.signature(model.get_rope_index).parameters
    cursors = {key: _GridCursor(model.config, key, kwargs) for key in _GRIDS if kwargs.get(key) is not None}
    per_token = {k: kwargs[k] for k in ("mm_token_type_ids", "attention_mask") if kwargs.get(k) is not None}
    if "mm_token_type_ids" in takes and "mm_token_type_ids" not in per_token:
        if cursors:
            raise ValueError(
                "a packed vision-language batch needs mm_token_type_ids [B, S] (0 text, 1 image, 2 video; the "
                "processor returns them): the mRoPE positions of each document are computed from them"
            )
        per_token["mm_token_type_ids"] = torch.zeros_like(ids)  # text only
    out = torch.zeros(3, *ids.shape, dtype=ids.dtype, device=ids.device)  # [3, B, S]
    for b, row in enumerate(doc_ids.tolist()):
        bounds = [0] + [t for t in range(1, len(row)) if row[t] != row[t - 1]] + [len(row)]
        for a, e in zip(bounds[:-1], bounds[1:]):
            doc = {"input_ids": ids[b : b + 1, a:e], **{k: v[b : b + 1, a:e] for k, v in per_token.items()}}  # [1, n]
            for cursor in cursors.values():
                doc.update(cursor.take(doc["input_ids"], b, a))
            position_ids, _ = model.get_rope_index(**{k: v for k, v in doc.items() if k in takes})
            out[:, b, a:e] = position_ids[:, 0]  # [3, n]
    for cursor in cursors.values():
        cursor.check_used()
    return out


class _GridCursor:
    """Walks one kind of grid rows (images or videos) in token order, handing each document the rows
    whose visual tokens it holds (a row of grid (t, h, w) has t*h*w / merge^2 tokens)."""

    def __init__(self, config, key: str, kwargs: dict):
        token_key, extras = _GRIDS[key]
        self.key, self.token_id = key, getattr(config, token_key)
        self.grid = kwargs[key]  # [N, 3]
        self.extras = {k: kwargs[k] for k in extras if kwargs.get(k) is not None}  # [N] each
        merge = config.vision_config.spatial_merge_size
        counts = (self.grid.prod(-1) // merge**2).tolist()
        self.ends = [sum(counts[: i + 1]) for i in range(len(counts))]  # tokens up to each row's end
        self.row, self.tokens = 0, 0

    def take(self, ids: torch.Tensor, b: int, start: int) -> dict:
        n = int((ids == self.token_id).sum())
        if n == 0:
            return {}
        first, self.tokens = self.row, self.tokens + n
        while self.row < len(self.ends) and self.ends[self.row] < self.tokens:
            self.row += 1
        if self.row == len(self.ends) or self.ends[self.row] != self.tokens:
            raise ValueError(
                f"row {b}, document at token {start}: its {n} visual tokens of {self.key} do not end where one of "
                f"the grid rows {self.grid.tolist()} ends (tokens of one image or video in two documents, or grid "
                "rows not in the order of the tokens)"
            )
        self.row += 1
        return {self.key: self.grid[first : self.row], **{k: v[first : self.row] for k, v in self.extras.items()}}

    def check_used(self) -> None:
        if self.row != len(self.ends):
            raise ValueError(
                f"{self.key} has {len(self.ends)} rows but the tokens hold {self.row} of them; give one grid row "
                "per image / video of the batch, in token order"
            )


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
