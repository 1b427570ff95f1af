"""Data path without processes: collation, packing, text formats, and the loader's sampling and
resume logic on a fake topology (the distributed checks are in tests/distributed/data/test_data.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import datasets
import pytest
import torch

from ulysses_sp.core.sequence_info import SEQ_INFO_KWARG
from ulysses_sp.core.sharding import shard_batch
from ulysses_sp.data.collate import collate_padded
from ulysses_sp.data.identical import batch_checksum
from ulysses_sp.data.loader import SPDataLoader, SPShardAdapter
from ulysses_sp.data.packing import PackedDataset, pack_collate
from ulysses_sp.data.text import BYTE_VOCAB_SIZE, Documents, encode_bytes, load_text_dataset, read_documents


def decode_bytes(ids) -> str:
    return bytes(torch.as_tensor(ids).reshape(-1).tolist()).decode("utf-8")


def _topo(dp_size=1, dp_rank=0, sp_size=1, sp_rank=0):
    return SimpleNamespace(dp_size=dp_size, dp_rank=dp_rank, sp_size=sp_size, sp_rank=sp_rank)


class CountingDataset(torch.utils.data.Dataset):
    """Sample i: tokens [i, i, ...] of length 2 + i % 3; records which indices were read."""

    def __init__(self, n):
        self.n, self.reads = n, []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.reads.append(i)
        return {"input_ids": [i] * (2 + i % 3), "idx": i}


def test_collate_pads_right_with_ignored_labels_and_continued_positions():
    batch = collate_padded(
        [
            {"input_ids": [5, 6, 7], "position_ids": [0, 1, 0], "idx": 1},
            {"input_ids": [8], "position_ids": [4], "idx": 2},
        ],
        pad_token_id=1,
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 0], [4, 5, 6]]
    assert batch["idx"].tolist() == [1, 2] and "attention_mask" not in batch
    own = collate_padded(
        [
            {"input_ids": [1, 2], "labels": [-100, 2], "attention_mask": [1, 1]},
            {"input_ids": [3], "labels": [3], "attention_mask": [1]},
        ]
    )
    assert own["labels"].tolist() == [[-100, 2], [3, -100]] and own["attention_mask"].tolist() == [[1, 1], [1, 0]]
    with pytest.raises(ValueError, match="empty batch"):
        collate_padded([])


def test_packed_dataset_splits_long_documents_and_restarts_positions():
    docs = Documents([[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [], [11, 12]])  # the empty document is dropped
    assert len(docs) == 3 and docs.lengths.tolist() == [3, 7, 2]
    packed = PackedDataset(docs, 4)  # 12 tokens -> 3 rows
    rows = [packed[i] for i in range(len(packed))]
    assert [r["input_ids"].tolist() for r in rows] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    assert [r["position_ids"].tolist() for r in rows] == [[0, 1, 2, 0], [0, 1, 2, 3], [0, 1, 0, 1]]
    assert packed[-1]["input_ids"].tolist() == [9, 10, 11, 12]
    with pytest.raises(IndexError):
        packed[3]
    # a generic dataset with labels; a short last row
    generic = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}]
    rows = [PackedDataset(generic, 3)[i] for i in range(2)]
    assert [r["labels"].tolist() for r in rows] == [[-100, 2, 3], [4, 5]]
    with pytest.raises(ValueError, match="cannot pack an empty dataset"):
        PackedDataset(Documents([[]]), 4)
    with pytest.raises(ValueError, match="seq_len must be an integer >= 1, got 0"):
        PackedDataset(docs, 0)


def test_pack_collate_flattens_a_batch():
    out = pack_collate([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [-100, 5]}])
    assert out["input_ids"].tolist() == [[1, 2, 3, 4, 5]] and out["labels"].tolist() == [[1, 2, 3, -100, 5]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1]]


def test_text_formats(tmp_path):
    assert BYTE_VOCAB_SIZE == 256 and decode_bytes(encode_bytes("héllo")) == "héllo"
    assert encode_bytes("").numel() == 0
    txt = tmp_path / "a.txt"
    txt.write_text("first doc\nstill first\n\n\n  \nsecond\n\n")
    assert [decode_bytes(d["input_ids"]) for d in read_documents(str(txt))] == ["first doc\nstill first", "second"]
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text(json.dumps({"text": "abc"}) + "\n\n" + json.dumps({"input_ids": [300, 301]}) + "\n")
    assert [d["input_ids"].tolist() for d in read_documents(str(jsonl))] == [[97, 98, 99], [300, 301]]
    datasets.Dataset.from_dict({"text": ["hello world", "x"]}).save_to_disk(str(tmp_path / "ds"))
    rows = load_text_dataset(str(tmp_path / "ds"), seq_len=4, pack=False)
    assert [decode_bytes(r["input_ids"]) for r in rows] == ["hell", "o wo", "rld", "x"]
    train = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3]]})
    datasets.DatasetDict({"train": train}).save_to_disk(str(tmp_path / "dd"))
    packed = load_text_dataset(str(tmp_path / "dd"), seq_len=2, pack=True)
    assert [packed[i]["input_ids"].tolist() for i in range(len(packed))] == [[1, 2], [3]]

    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"title": "no text"}\n')
    (tmp_path / "worse.jsonl").write_text("{not json\n")
    (tmp_path / "c.csv").write_text("a,b\n")
    (tmp_path / "plain_dir").mkdir()
    for path, err, match in [
        ("empty.txt", ValueError, "holds no tokens"),
        (
            "bad.jsonl",
            ValueError,
            r"bad.jsonl:2: expected an 'input_ids' list or a 'text' string, "
            r"found keys \['title'\]",
        ),
        ("worse.jsonl", ValueError, r"worse.jsonl:1: not valid JSON"),
        ("c.csv", ValueError, "unknown dataset format"),
        ("plain_dir", ValueError, "not one written by datasets save_to_disk"),
        ("missing.txt", FileNotFoundError, "does not exist"),
    ]:
        with pytest.raises(err, match=match):
            load_text_dataset(str(tmp_path / path), seq_len=8, pack=False)


def test_bundled_corpus_is_prose_that_packs():
    docs = read_documents(None)
    text = decode_bytes(docs.tokens)
    assert 60_000 <= len(text) <= 150_000 and len(docs) > 100 and int(docs.tokens.max()) < 256
    assert text.count(" the ") > 500 and text.isascii()
    packed = load_text_dataset(None, seq_len=256, pack=True)
    assert len(packed) == -(-docs.tokens.numel() // 256)
    assert torch.equal(torch.cat([packed[i]["input_ids"] for i in range(len(packed))]), docs.tokens)


def test_loader_splits_by_dp_rank_and_resumes_without_rereading():
    ds = CountingDataset(20)
    make = lambda dp_rank, data=ds: SPDataLoader(data, _topo(2, dp_rank, 2, 1), 3, seed=4)  # noqa: E731
    a, b = make(0), make(1)
    assert len(a) == 3  # 10 samples per dp rank, 3 full batches of 3
    idx_a, idx_b = a.batch_indices(), b.batch_indices()
    assert not set(sum(idx_a, [])) & set(sum(idx_b, []))
    assert idx_a != a.batch_indices(epoch=1)  # reshuffled per epoch
    full = [batch for batch in a]
    assert a.epoch == 1 and a.batches_seen == 0
    assert [sorted(batch["idx"].tolist()) for batch in full] == [sorted(i) for i in idx_a]
    assert all(batch[SEQ_INFO_KWARG].seq_len % 2 == 0 for batch in full)

    ds.reads.clear()
    first = make(0)
    it = iter(first)
    head = [next(it) for _ in range(2)]
    state = first.state_dict()
    assert state["epoch"] == 0 and state["batches_seen"] == 2
    resumed = make(0)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)  # the current epoch keeps its position
    ds.reads.clear()
    tail = list(resumed)
    assert ds.reads == idx_a[2]  # only the remaining batch was read
    for got, want in zip(head + tail, full):
        assert batch_checksum(got) == batch_checksum(want)
    resumed.set_epoch(3)
    assert (resumed.epoch, resumed.batches_seen) == (3, 0)

    with pytest.raises(
        ValueError,
        match=r"saved 12 samples into epoch 0 \(batches_seen=2 x batch_size=3 x "
        r"dp_size=2\), not a multiple of .* batch_size=4 x dp_size=2 = 8",
    ):
        SPDataLoader(ds, _topo(2, 0, 2, 1), 4, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="saved with seed=4, this loader has seed=5"):
        SPDataLoader(ds, _topo(2, 0, 2, 1), 3, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="saved with num_samples=20, this loader has num_samples=21"):
        SPDataLoader(CountingDataset(21), _topo(2, 0, 2, 1), 3, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match=r"5 samples over dp_size=2 ranks make no batch of 3 per rank"):
        SPDataLoader(CountingDataset(5), _topo(2, 0, 2, 1), 3)


def test_loader_resume_maps_the_position_to_another_dp_size():
    """Saved at dp=2 x batch 3 after 2 batches (12 samples of the epoch): a dp=1 x batch 6 loader and a
    dp=4 x batch 3 loader read exactly the samples the dp=2 run had left, none twice."""
    ds = CountingDataset(24)
    old = [SPDataLoader(ds, _topo(2, d), 3, seed=7) for d in range(2)]
    for loader in old:
        it = iter(loader)
        next(it), next(it)
    state = old[0].state_dict()
    left = sorted(i for loader in old for batch in loader.batch_indices()[2:] for i in batch)
    for dp, batch in ((1, 6), (4, 3)):
        new = [SPDataLoader(ds, _topo(dp, d), batch, seed=7) for d in range(dp)]
        for loader in new:
            loader.load_state_dict(state)
        read = sorted(int(i) for loader in new for b in loader for i in b["idx"])
        assert read == left, (dp, batch)


def test_loader_keeps_last_partial_batch_and_runs_workers():
    loader = SPDataLoader(CountingDataset(7), _topo(), 3, shuffle=False, drop_last=False, num_workers=1)
    batches = list(loader)
    assert len(loader) == 3 and [b["idx"].tolist() for b in batches] == [[0, 1, 2], [3, 4, 5], [6]]
    assert batches[0]["input_ids"].tolist() == [[0, 0, 0, 0], [1, 1, 1, 0], [2, 2, 2, 2]]
    assert batches[0]["shift_labels"].tolist() == [[0, -100, -100, -100], [1, 1, -100, -100], [2, 2, 2, -100]]


def test_loader_shards_follow_the_ring_layout():
    """With a ring (hybrid SP) the loader's shards are shard_batch's of the ring's load-balanced
    layout, not contiguous slices (a silent mismatch with attention otherwise)."""
    data = [{"input_ids": list(range(i, i + 13))} for i in range(4)]
    for rank in range(4):
        topo = SimpleNamespace(dp_size=1, dp_rank=0, sp_size=4, sp_rank=rank, ring_size=2)
        local = next(iter(SPDataLoader(data, topo, batch_size=2, shuffle=False, check_identical=False)))
        full = collate_padded(data[:2])
        want = shard_batch(full, topo)
        for key in ("input_ids", "position_ids", "shift_labels"):
            assert torch.equal(local[key], want[key]), key
        if rank == 1:  # holds chunk 3 of 4 (tokens 12-15), not the contiguous 4-7
            assert not torch.equal(local["input_ids"], shard_batch(full, _topo(sp_size=4, sp_rank=1))["input_ids"])


def test_collate_carries_images_and_pads_to_a_multiple():
    """A VLM's samples: pixel rows and grid sizes concatenated (even when a sample has as many patch rows
    as tokens), the sequence padded to a multiple of sp_size."""
    samples = [
        {"input_ids": [5, 6, 7, 8], "pixel_values": torch.ones(4, 12), "image_grid_thw": [[1, 2, 2]]},
        {"input_ids": [9, 10, 11], "pixel_values": torch.zeros(8, 12), "image_grid_thw": [[1, 2, 4]]},
    ]
    batch = collate_padded(samples, pad_to_multiple_of=3)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 0, 0], [9, 10, 11, 0, 0, 0]]
    assert batch["labels"][1].tolist() == [9, 10, 11, -100, -100, -100]
    assert batch["pixel_values"].shape == (12, 12) and batch["pixel_values"][:4].eq(1).all()
    assert batch["image_grid_thw"].tolist() == [[1, 2, 2], [1, 2, 4]]
    # a text-only sample adds no image rows, a video sample only video rows
    video = {"input_ids": [1, 2], "pixel_values_videos": torch.ones(8, 12), "video_grid_thw": [[2, 2, 2]]}
    batch = collate_padded([{"input_ids": [3]}, samples[0], video])
    assert batch["pixel_values"].shape == (4, 12) and batch["image_grid_thw"].tolist() == [[1, 2, 2]]
    assert batch["pixel_values_videos"].shape == (8, 12) and batch["video_grid_thw"].tolist() == [[2, 2, 2]]


class _WithLengths(list):
    """Documents with a ``lengths`` attribute, as text corpora have (PackedDataset then reads no item at setup)."""

    @property
    def lengths(self) -> torch.Tensor:
        return torch.tensor([len(d["input_ids"]) for d in self])


def _vlm_doc(n_text: int, image_rows: int = 0, fill: float = 0.0) -> dict:
    """n_text text tokens then one image of ``image_rows`` patches (image_rows / 4 tokens of type 1)."""
    ids = list(range(1, n_text + 1)) + [250] * (image_rows // 4)
    doc = {"input_ids": ids, "mm_token_type_ids": [0] * n_text + [1] * (image_rows // 4)}
    if image_rows:
        doc.update(
            pixel_values=torch.full((image_rows, 12), fill), image_grid_thw=torch.tensor([[1, 2, image_rows // 2]])
        )
    return doc


def test_packing_carries_a_vlm_documents_images_in_order():
    """pack_collate and PackedDataset(whole_documents=True): the documents' images concatenated in
    document order, mm_token_type_ids alongside the tokens (0 for a document without them); through
    SPDataLoader / SPShardAdapter with vlm=True the rows stay whole and the labels are the shard's; a split
    document with images, or a document longer than a whole-document row, is refused."""
    docs = [_vlm_doc(3, 8, 1.0), {"input_ids": [7, 8]}, _vlm_doc(2, 4, 2.0), _vlm_doc(5)]
    out = pack_collate(docs)
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 0, 1, 2, 3, 4]]
    assert out["mm_token_type_ids"].tolist() == [[0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0]]
    assert out["pixel_values"][:, 0].tolist() == [1.0] * 8 + [2.0] * 4
    assert out["image_grid_thw"].tolist() == [[1, 2, 4], [1, 2, 2]]

    packed = PackedDataset(docs, 8, whole_documents=True)  # lengths 5, 2, 3, 5 -> rows [d0 d1] [d2 d3]
    assert len(packed) == 2
    row = packed[1]
    assert row["input_ids"].tolist() == [1, 2, 250, 1, 2, 3, 4, 5] and row["position_ids"].tolist() == [
        0,
        1,
        2,
        0,
        1,
        2,
        3,
        4,
    ]
    assert row["mm_token_type_ids"].tolist() == [0, 0, 1, 0, 0, 0, 0, 0]
    assert row["pixel_values"][:, 0].tolist() == [2.0] * 4 and row["image_grid_thw"].tolist() == [[1, 2, 2]]
    assert "pixel_values" in packed[0] and packed[0]["image_grid_thw"].tolist() == [[1, 2, 4]]
    with pytest.raises(ValueError, match="document 0 has 5 tokens, more than seq_len=4"):
        PackedDataset(docs, 4, whole_documents=True)
    with pytest.raises(ValueError, match=r"document 0 carries images but crosses a row edge \(tokens 0..4 .*whole_doc"):
        PackedDataset(docs, 4)  # found at setup, in the pass that reads the lengths
    known = _WithLengths(docs)  # lengths known: no pass at setup, the row refuses it when read
    with pytest.raises(ValueError, match="document 0 carries images but crosses a row edge"):
        PackedDataset(known, 4)[0]
    # the loaders' vlm=True: rows whole with their images, the shard's labels (sp rank 1 of 2)
    rows = PackedDataset(docs, 8, whole_documents=True)
    topo = _topo(sp_size=2, sp_rank=1)
    (local,) = SPDataLoader(rows, topo, 2, shuffle=False, vlm=True)
    (adapted,) = SPShardAdapter([collate_padded([rows[0], rows[1]])], topo, check_identical=False, vlm=True)
    for batch in (local, adapted):
        assert batch["input_ids"].shape == (2, 8) and batch["shift_labels"].shape == (2, 4)
        assert batch["image_grid_thw"].tolist() == [[1, 2, 4], [1, 2, 2]]
    split = PackedDataset(docs, 7)[1]  # d2 whole inside the row keeps its image; d3 (text) is split
    assert split["input_ids"].tolist() == [1, 2, 250, 1, 2, 3, 4] and split["image_grid_thw"].tolist() == [[1, 2, 2]]
