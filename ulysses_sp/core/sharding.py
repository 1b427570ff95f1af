"""Cut one full batch into this rank's shard: pad, shift labels, describe the layout, slice.

Shape legend: B batch, S full sequence as given, S' = S padded up to a multiple of P, P = sp_size,
s = S'/P local tokens, E embedding width, K rows of multi-axis (mRoPE) position ids, D documents.

Pure tensor logic, no communication. Every rank of an SP group holds the same full batch (the data
loader samples by dp rank) and keeps tokens [sp_rank*s, (sp_rank+1)*s) of every row; with a ring
(``topology.ring_size`` > 1) S' is a multiple of 2P and each rank keeps its tokens of the
load-balanced layout (layout.py), every per-token tensor permuted alike.

Packed rows (several documents per row) are described by one of:
  * ``position_ids`` [B, S] that restart where a document starts (any value other than previous + 1);
  * ``seq_lens``: a list per row of its document lengths, each list summing to S;
  * ``cu_seqlens`` [D+1]: cumulative document lengths over the flattened B*S, starting at 0 and
    ending at B*S (flash-attn convention; ``cu_seq_lens_q`` from transformers'
    ``DataCollatorWithFlattening`` is read the same way). A row start always starts a document.
Missing position ids are built from that layout: 0, 1, ... restarting at every document. Given
position ids are used as they are; with ``seq_lens``/``cu_seqlens`` too, those decide the documents.

Labels: ``shift_labels[:, t] = labels[:, t + 1]``, computed on the full row *before* slicing (and
before the ring layout's permutation), so the
last token of a shard is labelled with the first token of the next shard. The last token of a row,
and the last token of every packed document, get ``ignore_index``: no token learns to predict the
next document. That is exactly what transformers' ``ForCausalLMLoss`` computes on a batch from
``DataCollatorWithFlattening`` (which writes -100 as the label of every document's first token),
i.e. the sum of the losses of each document run alone. Given ``shift_labels`` are used as they are.

Padding to S' appends to the last document of each row: input_ids get ``pad_token_id``, labels
``ignore_index``, position ids continue (last + 1, + 2, ...), a 2-D attention mask 0, any other
per-token tensor 0. Causal attention never lets a real token read a later padding token.

A custom full-sequence mask ([B, S, S], or [B|1, 1|N, S, S] as transformers takes it) is not sliced:
attention runs over all S' tokens on every rank. It is padded to S' x S' (no real token reads a
padding token, a padding token reads only itself) and returned as ``attention_mask``.

A vision-language model (``vlm=True``, core/vlm.py) is called with the whole sample: its vision
tower and mRoPE positions need every token, and its language model's pre-hook cuts the shard. Then
only ``shift_labels`` are sliced, and they ignore the image and video tokens (``mm_token_type_ids``
nonzero: placeholders, not text to predict); the model inputs are returned whole, padded to S'
(``input_ids``, ``mm_token_type_ids``, a 2-D ``attention_mask``, [K, B, S] position ids), with the
images (``pixel_values``, ``image_grid_thw``...) as given. 2-D position ids only mark packed
documents there (the model computes the mRoPE positions per document from the SequenceInfo).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .layout import padded_length, ring_size_of, take_local
from .sequence_info import SEQ_INFO_KWARG, SequenceInfo, build_sequence_info, check_non_negative, document_starts
from .vlm import IMAGE_KEYS, check_vlm_batch, text_only_labels

#: keys describing the full batch that are folded into the SequenceInfo and not returned.
_CONSUMED = (
    "labels",
    "attention_mask",
    "seq_lens",
    "cu_seqlens",
    "cu_seq_lens_q",
    "cu_seq_lens_k",
    "max_length_q",
    "max_length_k",
)


def shard_batch(batch: dict, topology, *, pad_token_id: int = 0, ignore_index: int = -100, vlm: bool = False) -> dict:
    """This rank's shard of a full batch (identical on every rank of the SP group).

    ``batch`` holds ``input_ids`` [B, S] (or ``inputs_embeds`` [B, S, E]) and optionally
    ``labels`` or ``shift_labels`` [B, S], ``position_ids`` [B|1, S] or [K, B|1, S], an
    ``attention_mask`` (2-D padding mask [B, S], 1 = token, 0 = padding; or a custom [B, S, S] /
    [B|1, 1|N, S, S] mask, see the module docstring), a packed layout (``seq_lens`` or
    ``cu_seqlens``) and any other tensors. ``topology`` needs only ``sp_size`` and ``sp_rank``
    (and ``ring_size``, default 1).

    Returns ``input_ids`` [B, s] (or ``inputs_embeds`` [B, s, E]), ``position_ids`` [B, s] (or
    [K, B, s]) with global positions, ``shift_labels`` [B, s] when labels were given, the
    :class:`SequenceInfo` of the padded full sequence under ``SEQ_INFO_KWARG``, every other tensor
    whose dim 1 is S sliced the same way, a custom mask padded to [.., S', S'] as ``attention_mask``,
    and everything else unchanged (a VLM's ``pixel_values`` / ``image_grid_thw`` are never sliced).
    ``labels``, a 2-D attention mask and the packed layout are not returned (the info carries them).
    Feed it to a model after ``ulysses_sp.apply``: ``model(**{k: v for k, v in local.items() if k != "shift_labels"})``.

    ``vlm=True``: the batch of a Qwen2.5-VL / Qwen3-VL model, which every rank calls with the whole
    sample. Only ``shift_labels`` [B, s] are sliced; ``input_ids`` [B, S'] and the other model inputs
    stay whole (module docstring), and the model shards them after merging the image features.
    """
    P, rank = topology.sp_size, topology.sp_rank
    if not (isinstance(P, int) and P >= 1 and 0 <= rank < P):
        raise ValueError(f"topology must have sp_size >= 1 and 0 <= sp_rank < sp_size, got {P=} {rank=}")
    if SEQ_INFO_KWARG in batch:
        raise ValueError(f"the batch already has {SEQ_INFO_KWARG!r}: it is a shard already; pass the full batch")
    ring = ring_size_of(topology)
    check_vlm_batch(batch, vlm, ring)
    tokens = _tokens(batch)
    B, S = tokens.shape[:2]
    pad = padded_length(S, P, ring) - S
    starts = _explicit_starts(batch, B, S, tokens.device)  # [B, S] bool or None
    explicit = starts is not None
    position_ids = _position_ids(batch.get("position_ids"), starts, B, S, tokens.device)  # [B, S] / [K, B, S]
    if not explicit:
        rows = position_ids if position_ids.dim() == 2 else position_ids[0]  # [B, S]
        starts = document_starts(rows)
    mask, custom = batch.get("attention_mask"), None
    if mask is not None and mask.dim() in (3, 4):
        mask, custom = None, _pad_custom_mask(mask, B, S, pad)  # [B, S', S'] / [B|1, 1|N, S', S']
    elif mask is not None and tuple(mask.shape) != (B, S):
        raise ValueError(
            f"attention_mask must be a 2-D padding mask [B, S] = [{B}, {S}] (1 = token, 0 = padding) "
            f"or a custom mask [B, S, S] / [B, 1, S, S] over the full sequence; got {list(mask.shape)}"
        )
    shifted = _shift_labels(text_only_labels(batch, ignore_index) if vlm else batch, starts, B, S, ignore_index)

    full_pos = _continue_positions(position_ids, pad)  # [B, S'] / [K, B, S']
    padded_starts = _pad(starts, 1, pad, False)  # [B, S']
    info = build_sequence_info(
        full_pos,
        None if mask is None else _pad(mask, 1, pad, 0),
        _cu_seqlens_from_starts(padded_starts) if explicit else None,
    )

    # a VLM's model inputs stay whole, padded to S' (the model shards them itself)
    cut = (lambda t, dim: t) if vlm else (lambda t, dim: take_local(t, dim, P, ring, rank).clone())
    local = {}
    for key, value in batch.items():
        if key in _CONSUMED or key in ("position_ids", "shift_labels"):
            continue
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == S and key not in IMAGE_KEYS:
            fill = pad_token_id if key == "input_ids" else 0
            value = cut(_pad(value, 1, pad, fill), 1)  # [B, s, ...] ([B, S', ...] for a VLM)
        local[key] = value
    if not vlm or full_pos.dim() == 3:  # a VLM's 2-D ids only marked the documents
        local["position_ids"] = cut(full_pos, full_pos.dim() - 1)  # [B, s] / [K, B, s] ([K, B, S'] for a VLM)
    if vlm and mask is not None:
        local["attention_mask"] = _pad(mask, 1, pad, 0)  # [B, S']: the model's mRoPE positions skip padding
    if shifted is not None:
        local["shift_labels"] = take_local(_pad(shifted, 1, pad, ignore_index), 1, P, ring, rank).clone()  # [B, s]
    if custom is not None:
        local["attention_mask"] = custom  # the full sequence's: attention reads all S' tokens
    local[SEQ_INFO_KWARG] = info
    return local


def input_tokens(inputs: Mapping, what: str = "the batch") -> torch.Tensor:
    """``input_ids`` [B, s] or ``inputs_embeds`` [B, s, E] of a batch or a model call's keyword
    arguments; ValueError naming ``what`` and its keys when it has neither."""
    tokens = inputs.get("input_ids")
    if tokens is None:
        tokens = inputs.get("inputs_embeds")
    if tokens is None:
        raise ValueError(f"{what} has neither input_ids nor inputs_embeds (keys: {sorted(inputs)})")
    return tokens


def make_shift_labels(
    labels: torch.Tensor, doc_starts: torch.Tensor | None = None, ignore_index: int = -100
) -> torch.Tensor:
    """[B, S] labels -> [B, S] targets: ``out[:, t] = labels[:, t+1]``; ``ignore_index`` at the last
    token of each row and before every document start (``doc_starts`` [B, S] bool)."""
    out = torch.full_like(labels, ignore_index)
    out[:, :-1] = labels[:, 1:]
    if doc_starts is not None:
        out[:, :-1].masked_fill_(doc_starts[:, 1:], ignore_index)
    return out


def positions_from_starts(starts: torch.Tensor) -> torch.Tensor:
    """[B, S] bool document starts (column 0 True) -> [B, S] int64 positions restarting at each start."""
    idx = torch.arange(starts.shape[1], device=starts.device).expand_as(starts)  # [B, S]
    last_start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # [B, S]
    return idx - last_start


def to_device(local_batch: dict, device) -> dict:
    """Move every tensor of a shard, and its SequenceInfo, to ``device``; other values unchanged."""
    moved = {}
    for key, value in local_batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
        elif isinstance(value, SequenceInfo):
            value = value.to(device)
        moved[key] = value
    return moved


# --- helpers -------------------------------------------------------------------------------------


def _tokens(batch: dict) -> torch.Tensor:
    tokens = input_tokens(batch)
    if tokens.dim() < 2:
        raise ValueError(f"input_ids must be [B, S] (inputs_embeds [B, S, E]), got {list(tokens.shape)}")
    if tokens.shape[1] == 0:
        raise ValueError(f"the batch has an empty sequence (shape {list(tokens.shape)}); nothing to shard")
    return tokens


def _explicit_starts(batch: dict, B: int, S: int, device) -> torch.Tensor | None:
    """Document starts [B, S] from ``seq_lens`` or ``cu_seqlens``; None when neither is given."""
    seq_lens, cu = batch.get("seq_lens"), batch.get("cu_seqlens")
    if cu is None:
        cu = batch.get("cu_seq_lens_q")
    if seq_lens is not None and cu is not None:
        raise ValueError("give either seq_lens or cu_seqlens for a packed batch, not both")
    if seq_lens is None and cu is None:
        return None
    starts = torch.zeros(B, S, dtype=torch.bool, device=device)
    if seq_lens is not None:
        if len(seq_lens) != B:
            raise ValueError(f"seq_lens must hold one list of document lengths per row ({B} rows), got {len(seq_lens)}")
        for b, lens in enumerate(seq_lens):
            lens = [int(n) for n in lens]
            if sum(lens) != S or any(n <= 0 for n in lens):
                raise ValueError(
                    f"seq_lens[{b}] = {lens} must be positive document lengths summing to S = {S} "
                    f"(they sum to {sum(lens)})"
                )
            offsets = torch.tensor(lens, device=device).cumsum(0)[:-1]  # starts after the first
            starts[b, offsets] = True
    else:
        cu = torch.as_tensor(cu, device=device).long()
        if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != B * S or bool((cu.diff() < 0).any()):
            raise ValueError(
                f"cu_seqlens must be non-decreasing document offsets from 0 to B*S = {B}*{S} = {B * S} "
                f"over the flattened batch, got {cu.tolist()}"
            )
        offsets = cu[:-1]
        starts.view(-1)[offsets[offsets < B * S]] = True  # empty trailing documents start nothing
    starts[:, 0] = True
    return starts


def _position_ids(position_ids, starts, B: int, S: int, device) -> torch.Tensor:
    """Given position ids checked and expanded to B rows, or built from the document starts."""
    if position_ids is None:
        if starts is None:
            return torch.arange(S, device=device).expand(B, S)  # [B, S]
        return positions_from_starts(starts)
    shape = list(position_ids.shape)
    ok = (
        position_ids.dim() in (2, 3) and shape[-1] == S and shape[-2] in (1, B) and not position_ids.is_floating_point()
    )
    if not ok:
        raise ValueError(
            f"position_ids must be integer [B, S] = [{B}, {S}] (or [1, {S}]), or [K, B, S] for "
            f"multi-axis (mRoPE) ids; got {shape} {position_ids.dtype}"
        )
    check_non_negative(position_ids)
    return position_ids.expand(*shape[:-2], B, S)


def _shift_labels(batch: dict, starts, B: int, S: int, ignore_index: int) -> torch.Tensor | None:
    for key in ("shift_labels", "labels"):
        labels = batch.get(key)
        if labels is not None and tuple(labels.shape) != (B, S):
            raise ValueError(f"{key} must be [B, S] = [{B}, {S}] like the tokens, got {list(labels.shape)}")
    if batch.get("shift_labels") is not None:
        return batch["shift_labels"]
    if batch.get("labels") is not None:
        return make_shift_labels(batch["labels"], starts, ignore_index)
    return None


def _pad(t: torch.Tensor, dim: int, n: int, value) -> torch.Tensor:
    """Append ``n`` entries of ``value`` along ``dim``."""
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t, t.new_full(shape, value)], dim=dim)


def _pad_custom_mask(mask: torch.Tensor, B: int, S: int, n: int) -> torch.Tensor:
    """[B|1, (1|N,) S, S] -> [.., S+n, S+n]: no real token reads a padding token, a padding token
    reads only itself (bool/integer masks: nonzero = attend; float masks: additive, 0 = attend)."""
    if mask.shape[0] not in (1, B) or tuple(mask.shape[-2:]) != (S, S):
        raise ValueError(
            f"a custom attention_mask must cover the full sequence, [B, S, S] or [B, 1, S, S] with "
            f"B = {B}, S = {S}; got {list(mask.shape)}"
        )
    if n == 0:
        return mask
    blocked, allowed = (torch.finfo(mask.dtype).min, 0) if mask.is_floating_point() else (0, 1)
    out = mask.new_full((*mask.shape[:-2], S + n, S + n), blocked)  # [.., S', S']
    out[..., :S, :S] = mask
    pads = torch.arange(S, S + n, device=mask.device)
    out[..., pads, pads] = allowed
    return out


def _continue_positions(position_ids: torch.Tensor, n: int) -> torch.Tensor:
    """[..., B, S] -> [..., B, S+n]: padding continues each row (last + 1, + 2, ...)."""
    if n == 0:
        return position_ids
    step = torch.arange(1, n + 1, device=position_ids.device, dtype=position_ids.dtype)  # [n]
    return torch.cat([position_ids, position_ids[..., -1:] + step], dim=-1)


def _cu_seqlens_from_starts(starts: torch.Tensor) -> torch.Tensor:
    """[B, S] bool -> [D+1] int32 cumulative document offsets over the flattened B*S."""
    flat = starts.reshape(-1)  # [B*S]
    end = torch.tensor([flat.numel()], device=flat.device)
    return torch.cat([flat.nonzero().squeeze(1), end]).to(torch.int32)
