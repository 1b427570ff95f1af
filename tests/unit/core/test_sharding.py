"""shard_batch: padding, label shift across shards, packing layouts, mRoPE ids, errors.

Every check reassembles the shards of all ranks and compares with a padded full batch written out
by hand, so slicing, padding and shifting are verified exactly."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ulysses_sp.core.sequence_info import SEQ_INFO_KWARG, SequenceInfo
from ulysses_sp.core.sharding import make_shift_labels, positions_from_starts, shard_batch, to_device


def _topo(P, r):
    return SimpleNamespace(sp_size=P, sp_rank=r)


def _all_shards(batch, P, **kw):
    return [shard_batch(batch, _topo(P, r), **kw) for r in range(P)]


def _cat(shards, key, dim=1):
    return torch.cat([s[key] for s in shards], dim=dim)


def test_pad_shift_and_reassemble_uneven_length():
    ids = torch.arange(1, 21).view(2, 10)  # S=10, P=4 -> S'=12, s=3
    extra = torch.arange(20).view(2, 10) * 10  # another per-token tensor
    batch = {
        "input_ids": ids,
        "labels": ids.clone(),
        "token_type_ids": extra,
        "note": "keep",
        "ids": torch.tensor([7, 8]),
    }
    shards = _all_shards(batch, 4, pad_token_id=99)
    for sh in shards:
        assert sh["input_ids"].shape == (2, 3) and sh["position_ids"].shape == (2, 3)
        assert "labels" not in sh and "attention_mask" not in sh
        assert sh["note"] == "keep" and torch.equal(sh["ids"], torch.tensor([7, 8]))
        assert sh[SEQ_INFO_KWARG].seq_len == 12 and sh[SEQ_INFO_KWARG].is_plain
    assert _cat(shards, "input_ids").tolist() == [list(range(1, 11)) + [99, 99], list(range(11, 21)) + [99, 99]]
    assert _cat(shards, "position_ids").tolist() == [list(range(12))] * 2  # padding continues the positions
    assert _cat(shards, "shift_labels").tolist() == [list(range(2, 11)) + [-100] * 3, list(range(12, 21)) + [-100] * 3]
    assert _cat(shards, "token_type_ids").tolist() == [
        list(range(0, 100, 10)) + [0, 0],
        list(range(100, 200, 10)) + [0, 0],
    ]
    # a shard's last token is labelled with the next shard's first token
    for r in range(3):
        assert shards[r]["shift_labels"][0, -1] == shards[r + 1]["input_ids"][0, 0]


def test_given_positions_continue_and_given_shift_labels_only_pad():
    ids = torch.arange(5).view(1, 5)
    pos = torch.tensor([[10, 11, 12, 13, 14]])
    sl = torch.tensor([[5, 6, 7, 8, 9]])
    shards = _all_shards({"input_ids": ids, "position_ids": pos, "shift_labels": sl, "labels": ids}, 2)
    assert _cat(shards, "position_ids").tolist() == [[10, 11, 12, 13, 14, 15]]
    assert _cat(shards, "shift_labels").tolist() == [[5, 6, 7, 8, 9, -100]]
    # [1, S] position ids broadcast to every row
    two = shard_batch(
        {"input_ids": torch.zeros(3, 4, dtype=torch.long), "position_ids": torch.arange(4).view(1, 4)}, _topo(2, 1)
    )
    assert two["position_ids"].tolist() == [[2, 3]] * 3


def test_custom_masks_are_padded_not_sliced():
    ids = torch.arange(6).view(1, 6)  # S=6, P=4 -> S'=8
    keep = torch.ones(1, 6, 6, dtype=torch.bool).tril()  # [B, S, S]
    additive = torch.where(keep, 0.0, float("-inf")).unsqueeze(1).expand(1, 2, 6, 6)  # [B, 2 heads, S, S]
    for mask, allowed in ((keep, True), (keep.long(), 1), (additive, 0.0)):
        shards = _all_shards({"input_ids": ids, "attention_mask": mask}, 4)
        for sh in shards:
            assert sh[SEQ_INFO_KWARG].is_plain and sh["input_ids"].shape == (1, 2)
        out = shards[0]["attention_mask"]
        assert out.shape == (*mask.shape[:-2], 8, 8) and out.dtype == mask.dtype
        assert torch.equal(out[..., :6, :6], mask)
        blocked = torch.finfo(out.dtype).min if out.is_floating_point() else 0
        pad_rows = out[..., 6:, :].reshape(-1, 2, 8)
        assert (pad_rows[:, 0, 6] == allowed).all() and (pad_rows[:, 1, 7] == allowed).all()  # itself
        assert (out[..., :6, 6:] == blocked).all() and (pad_rows[:, 0, :6] == blocked).all()
        assert (pad_rows[:, 0, 7] == blocked).all() and (pad_rows[:, 1, 6] == blocked).all()


def test_packed_layouts_agree_and_labels_stay_in_documents():
    ids = torch.arange(100, 114).view(2, 7)
    seq_lens = [[3, 2, 2], [7]]
    cu = torch.tensor([0, 3, 5, 7, 14], dtype=torch.int32)
    want_pos = [[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 7]]  # padded to 8, last document continued
    want_labels = [[101, 102, -100, 104, -100, 106, -100, -100], [108, 109, 110, 111, 112, 113, -100, -100]]
    from_positions = {"position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1], list(range(7))])}
    for layout in ({"seq_lens": seq_lens}, {"cu_seqlens": cu}, {"cu_seq_lens_q": cu}, from_positions):
        shards = _all_shards({"input_ids": ids, "labels": ids, **layout}, 2)
        assert _cat(shards, "position_ids").tolist() == want_pos, layout
        assert _cat(shards, "shift_labels").tolist() == want_labels, layout
        assert not {"seq_lens", "cu_seqlens", "cu_seq_lens_q"} & set(shards[0])
        info = shards[1][SEQ_INFO_KWARG]
        assert info.doc_ids.tolist() == [[0, 0, 0, 1, 1, 2, 2, 2], [0] * 8], layout
        assert info.cu_seqlens.tolist() == [0, 3, 5, 8, 16] and info.max_seqlen == 8, layout


def test_explicit_layout_decides_documents_when_positions_do_not_restart():
    ids = torch.arange(1, 7).view(1, 6)
    batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(6).view(1, 6), "seq_lens": [[2, 4]]}
    shards = _all_shards(batch, 2)
    assert _cat(shards, "position_ids").tolist() == [[0, 1, 2, 3, 4, 5]]  # as given
    assert _cat(shards, "shift_labels").tolist() == [[2, -100, 4, 5, 6, -100]]
    assert shards[0][SEQ_INFO_KWARG].doc_ids.tolist() == [[0, 0, 1, 1, 1, 1]]


def test_attention_mask_folds_into_info():
    ids = torch.arange(1, 8).view(1, 7)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    shards = _all_shards({"input_ids": ids, "attention_mask": mask}, 4)  # S'=8
    assert all("attention_mask" not in s for s in shards)
    info = shards[2][SEQ_INFO_KWARG]
    assert info.key_valid.tolist() == [[True] * 5 + [False] * 3]
    assert info.valid_index.tolist() == [0, 1, 2, 3, 4] and info.cu_seqlens.tolist() == [0, 5]
    assert "shift_labels" not in shards[0]  # no labels given, none made


def test_mrope_three_axis_positions_are_sliced_on_the_last_dim():
    ids = torch.arange(6).view(1, 6)
    pos = torch.stack(
        [torch.tensor([[0, 1, 2, 0, 1, 2]]), torch.tensor([[0, 0, 1, 0, 0, 1]]), torch.tensor([[0, 1, 0, 0, 1, 0]])]
    )  # [3, 1, 6]; axis 0 restarts: two documents
    shards = _all_shards({"input_ids": ids, "position_ids": pos}, 4)  # S'=8, s=2
    assert shards[0]["position_ids"].shape == (3, 1, 2)
    full = _cat(shards, "position_ids", dim=-1)
    assert full.tolist() == [[[0, 1, 2, 0, 1, 2, 3, 4]], [[0, 0, 1, 0, 0, 1, 2, 3]], [[0, 1, 0, 0, 1, 0, 1, 2]]]
    assert shards[3][SEQ_INFO_KWARG].doc_ids.tolist() == [[0, 0, 0, 1, 1, 1, 1, 1]]


def test_inputs_embeds_and_short_sequences():
    emb = torch.randn(2, 1, 4)  # S=1 < P=4: padded to 4 with zeros
    shards = _all_shards({"inputs_embeds": emb, "labels": torch.tensor([[5], [6]])}, 4)
    assert [tuple(s["inputs_embeds"].shape) for s in shards] == [(2, 1, 4)] * 4
    assert torch.equal(shards[0]["inputs_embeds"], emb) and not shards[3]["inputs_embeds"].any()
    assert _cat(shards, "shift_labels").tolist() == [[-100] * 4] * 2
    one = shard_batch({"input_ids": torch.tensor([[3, 4, 5]])}, _topo(1, 0))  # sp=1: nothing padded
    assert one["input_ids"].tolist() == [[3, 4, 5]] and one[SEQ_INFO_KWARG].seq_len == 3


def test_helpers():
    starts = torch.tensor([[True, False, True, True, False]])
    assert positions_from_starts(starts).tolist() == [[0, 1, 0, 0, 1]]
    assert make_shift_labels(torch.tensor([[1, 2, 3, 4, 5]]), starts).tolist() == [[2, -100, -100, 5, -100]]
    local = shard_batch(
        {"input_ids": torch.ones(1, 4, dtype=torch.long), "position_ids": torch.tensor([[0, 1, 0, 1]])}, _topo(2, 0)
    )
    moved = to_device(local, torch.device("meta"))
    assert moved["input_ids"].is_meta and moved["position_ids"].is_meta
    assert isinstance(moved[SEQ_INFO_KWARG], SequenceInfo) and moved[SEQ_INFO_KWARG].doc_ids.is_meta


@pytest.mark.parametrize(
    "batch,match",
    [
        ({"labels": torch.zeros(1, 4)}, r"neither input_ids nor inputs_embeds \(keys: \['labels'\]\)"),
        ({"input_ids": torch.zeros(2, 0, dtype=torch.long)}, r"empty sequence \(shape \[2, 0\]\)"),
        ({"input_ids": torch.zeros(4, dtype=torch.long)}, r"input_ids must be \[B, S\].*got \[4\]"),
        (
            {"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": torch.zeros(2, 3, dtype=torch.long)},
            r"labels must be \[B, S\] = \[2, 4\] like the tokens, got \[2, 3\]",
        ),
        (
            {"input_ids": torch.zeros(2, 4, dtype=torch.long), "position_ids": torch.zeros(2, 5, dtype=torch.long)},
            r"position_ids must be integer \[B, S\] = \[2, 4\].*got \[2, 5\]",
        ),
        (
            {"input_ids": torch.zeros(2, 4, dtype=torch.long), "position_ids": torch.zeros(2, 4)},
            r"position_ids must be integer.*torch.float32",
        ),
        (
            {"input_ids": torch.zeros(2, 4, dtype=torch.long), "cu_seqlens": torch.tensor([0, 3, 7])},
            r"from 0 to B\*S = 2\*4 = 8 .* got \[0, 3, 7\]",
        ),
        (
            {"input_ids": torch.zeros(2, 4, dtype=torch.long), "cu_seqlens": torch.tensor([0, 5, 3, 8])},
            r"non-decreasing",
        ),
        (
            {"input_ids": torch.zeros(2, 4, dtype=torch.long), "seq_lens": [[4]]},
            r"one list .* per row \(2 rows\), got 1",
        ),
        (
            {"input_ids": torch.zeros(1, 4, dtype=torch.long), "seq_lens": [[2, 1]]},
            r"seq_lens\[0\] = \[2, 1\] must be positive document lengths summing to S = 4 \(they sum to 3\)",
        ),
        (
            {"input_ids": torch.zeros(1, 4, dtype=torch.long), "seq_lens": [[4]], "cu_seqlens": torch.tensor([0, 4])},
            r"either seq_lens or cu_seqlens",
        ),
        (
            {"input_ids": torch.zeros(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 3)},
            r"attention_mask must be a 2-D padding mask \[B, S\] = \[1, 4\].*got \[1, 3\]",
        ),
        (
            {"input_ids": torch.zeros(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 1, 4, 3)},
            r"custom attention_mask must cover the full sequence.*B = 1, S = 4; got \[1, 1, 4, 3\]",
        ),
        ({"input_ids": torch.zeros(1, 4, dtype=torch.long), SEQ_INFO_KWARG: SequenceInfo(4)}, r"a shard already"),
    ],
)
def test_errors_name_the_numbers(batch, match):
    with pytest.raises(ValueError, match=match):
        shard_batch(batch, _topo(2, 0))


def test_bad_topology():
    with pytest.raises(ValueError, match=r"0 <= sp_rank < sp_size, got P=2 rank=2"):
        shard_batch({"input_ids": torch.zeros(1, 4, dtype=torch.long)}, _topo(2, 2))


def test_negative_position_ids_in_a_batch():
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "position_ids": torch.tensor([[0, 1, -1, 2]])}
    with pytest.raises(ValueError, match=r"position_ids hold negative values \(min -1\)"):
        shard_batch(batch, _topo(2, 0))


def test_sequence_shorter_than_sp_is_padded_not_refused():
    batch = {"input_ids": torch.tensor([[7, 8]]), "labels": torch.tensor([[7, 8]])}
    shards = [shard_batch(batch, _topo(4, r)) for r in range(4)]
    assert [sh["input_ids"].tolist() for sh in shards] == [[[7]], [[8]], [[0]], [[0]]]
    assert [sh["shift_labels"].tolist() for sh in shards] == [[[8]], [[-100]], [[-100]], [[-100]]]
    assert [sh["position_ids"].tolist() for sh in shards] == [[[0]], [[1]], [[2]], [[3]]]


def test_vlm_batch_keeps_model_inputs_whole_and_slices_the_labels():
    """vlm=True: pixel_values / image_grid_thw whole (even when a dim happens to equal S), the model
    inputs whole and padded to a multiple of P (2-D position ids only mark documents, so they go into the
    SequenceInfo and are not returned), shift_labels sliced and ignoring the image tokens; without
    vlm=True images are refused."""
    S = 5
    ids = torch.arange(1, 2 * S + 1).view(2, S)
    batch = {
        "input_ids": ids,
        "labels": ids,
        "position_ids": torch.tensor([[0, 1, 2, 0, 1]] * 2),  # two documents per row
        "mm_token_type_ids": torch.tensor([[0, 1, 0, 0, 0]] * 2),  # token 1 is an image's
        "attention_mask": torch.ones(2, S, dtype=torch.long),
        "pixel_values": torch.randn(16, S),  # [patches, C*T*p*p]: dim 1 equals S here by chance
        "image_grid_thw": torch.tensor([[1, 2, 2], [1, 2, 2]]),
    }
    local = shard_batch(batch, SimpleNamespace(sp_size=2, sp_rank=1), vlm=True)
    assert torch.equal(local["pixel_values"], batch["pixel_values"])
    assert torch.equal(local["image_grid_thw"], batch["image_grid_thw"])
    assert local["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 10, 0]]
    assert local["mm_token_type_ids"].tolist() == [[0, 1, 0, 0, 0, 0]] * 2
    assert local["attention_mask"].tolist() == [[1] * 5 + [0]] * 2
    assert local["shift_labels"].tolist() == [[5, -100, -100], [10, -100, -100]]  # tokens 3..5 of the rows
    assert "position_ids" not in local and "labels" not in local
    info = local[SEQ_INFO_KWARG]
    assert info.seq_len == 6 and info.doc_ids.tolist() == [[0, 0, 0, 1, 1, 1]] * 2
    # the image token is never a target: token 0's label is ignored (tokens 0..2 of the rows on rank 0)
    assert shard_batch(batch, _topo(2, 0), vlm=True)["shift_labels"].tolist() == [[-100, 3, -100], [-100, 8, -100]]
    mrope = torch.arange(S).expand(3, 2, S)  # [K, B, S] ids are model inputs: whole, padding continues
    assert shard_batch({**batch, "position_ids": mrope}, _topo(2, 0), vlm=True)["position_ids"].shape == (3, 2, 6)
    with pytest.raises(ValueError, match=r"has \['image_grid_thw', 'pixel_values'\].*pass vlm=True"):
        shard_batch(batch, _topo(2, 0))
    with pytest.raises(ValueError, match="ring attention .ring_size=2. is not supported"):
        shard_batch(batch, SimpleNamespace(sp_size=4, sp_rank=0, ring_size=2), vlm=True)
    with pytest.raises(ValueError, match="2-D padding attention_mask"):
        shard_batch({**batch, "attention_mask": torch.ones(2, S, S)}, _topo(2, 0), vlm=True)
