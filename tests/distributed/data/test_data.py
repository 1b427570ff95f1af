"""The data path on real process groups (dp2 x sp2): identical batches per SP group, disjoint DP
samples, divergence detection, exact resume, packing, and model parity on shard_batch output."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import ulysses_sp
from tests.distributed import harness
from tests.distributed.core.test_vlm import check_vlm
from tests.helpers import clone, tiny_model, tokens, tolerances
from ulysses_sp.core import comm
from ulysses_sp.core.sequence_info import SEQ_INFO_KWARG
from ulysses_sp.core.sharding import shard_batch
from ulysses_sp.data.collate import collate_padded
from ulysses_sp.data.identical import SPBatchMismatchError, batch_checksum
from ulysses_sp.data.loader import SPDataLoader, SPShardAdapter
from ulysses_sp.data.packing import PackedDataset, pack_collate
from ulysses_sp.data.text import Documents


class Samples(Dataset):
    """Sample i: 3..9 distinct tokens derived from i, plus its index; logs the indices read.
    ``offset`` shifts the tokens (a deliberately rank-dependent dataset)."""

    def __init__(self, n, offset=0):
        self.n, self.offset, self.reads = n, offset, []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.reads.append(i)
        length = 3 + (5 * i) % 7
        return {"input_ids": ((7 * i + torch.arange(length)) % 250 + 1 + self.offset).tolist(), "idx": i}


def _gather_seq(t, topo):
    """[..., s] shards of the SP group -> [..., S'] (an object gather: no collective warm-up cost)."""
    return torch.cat(comm.all_gather_object(t, topo.sp_group), dim=-1)


def _check_sharding_and_coverage(ctx, topo):
    ds = Samples(24)
    loader = SPDataLoader(ds, topo, 2, seed=3, check_identical=True)
    assert len(loader) == 6
    everyone = comm.all_gather_object(loader.batch_indices(), None)  # global rank order
    for dp in range(2):
        assert everyone[2 * dp] == everyone[2 * dp + 1], "SP ranks read different samples"
    flat = [sorted(sum(everyone[2 * dp], [])) for dp in range(2)]
    assert not set(flat[0]) & set(flat[1]) and sorted(flat[0] + flat[1]) == list(range(24))
    for i, local in enumerate(loader):  # every shard reassembles the collated full batch of its indices
        full = collate_padded([ds[j] for j in loader.batch_indices(0)[i]])
        want = shard_batch(full, _FakeTopo(1, 0))
        S = full["input_ids"].shape[1]
        got_ids = _gather_seq(local["input_ids"], topo)
        assert torch.equal(got_ids[:, :S], want["input_ids"]) and not got_ids[:, S:].any()
        assert torch.equal(_gather_seq(local["shift_labels"], topo)[:, :S], want["shift_labels"])
        assert local["idx"].tolist() == loader.batch_indices(0)[i]
        assert local[SEQ_INFO_KWARG].seq_len == got_ids.shape[1]


class _FakeTopo:
    def __init__(self, sp_size, sp_rank):
        self.sp_size, self.sp_rank = sp_size, sp_rank


def _check_resume(ctx, topo):
    ds = Samples(24)
    straight = SPDataLoader(ds, topo, 2, seed=5)
    want = [batch_checksum(b) for b in straight] + [batch_checksum(b) for b in straight]  # epochs 0 and 1
    first = SPDataLoader(ds, topo, 2, seed=5)
    it = iter(first)
    got = [batch_checksum(next(it)) for _ in range(4)]
    state = first.state_dict()
    assert comm.all_gather_object(state, None) == [state] * ctx.world_size  # one state for every rank
    ds.reads.clear()
    resumed = SPDataLoader(ds, topo, 2, seed=5)
    resumed.load_state_dict(state)
    for epoch in range(resumed.epoch, 2):
        resumed.set_epoch(epoch)
        got += [batch_checksum(b) for b in resumed]
    assert got == want
    skipped = sum(first.batch_indices(0)[:4], [])
    remaining = sum(first.batch_indices(0)[4:], [])
    assert sorted(ds.reads[: len(remaining)]) == sorted(remaining), "resume read skipped samples"
    assert not set(ds.reads[: len(remaining)]) & set(skipped)


def _check_divergence(ctx, topo):
    divergent = SPDataLoader(Samples(8, offset=ctx.rank), topo, 2, check_identical=True)
    ranks = re.escape(str(topo.sp_ranks()))
    first = re.escape(str(topo.sp_ranks()[:1]))
    with pytest.raises(
        SPBatchMismatchError,
        match=rf"ranks {ranks} of one SP group.*epoch 0, batch 0.*"
        rf"ranks {first} hold batch.*DeepSpeed #7484",
    ):
        next(iter(divergent))
    # DeepSpeed #7484: a user's loader sampling by global rank gives each SP rank a different sample
    ds = Samples(16)
    trap = DataLoader(
        ds,
        batch_size=2,
        collate_fn=collate_padded,
        sampler=DistributedSampler(ds, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=False),
    )
    with pytest.raises(SPBatchMismatchError, match=rf"ranks {ranks} of one SP group .* at batch 0"):
        next(iter(SPShardAdapter(trap, topo)))
    right = DataLoader(
        ds,
        batch_size=2,
        collate_fn=collate_padded,
        sampler=DistributedSampler(ds, num_replicas=topo.dp_size, rank=topo.dp_rank, shuffle=False),
    )
    assert len(list(SPShardAdapter(right, topo))) == len(right) == 4


def _check_packing(ctx, topo):
    docs = Documents([torch.arange(1 + 20 * d, 1 + 20 * d + n) for d, n in enumerate([5, 17, 3, 9, 2, 11, 6, 8])])
    packed = PackedDataset(docs, 15)  # 61 tokens -> rows of 15 (odd: padded to 16 for sp=2)
    for local in SPDataLoader(packed, topo, 2, check_identical=True, drop_last=False):
        pos = _gather_seq(local["position_ids"], topo)  # [B, 16]
        ids = _gather_seq(local["input_ids"], topo)
        labels = _gather_seq(local["shift_labels"], topo)
        starts = torch.ones_like(pos, dtype=torch.bool)
        starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
        # tokens of one document are consecutive integers here, so a restart must be a new document
        jumps = torch.ones_like(starts)
        jumps[:, 1:] = ids[:, 1:] != ids[:, :-1] + 1
        real = ids != 0
        assert torch.equal(starts & real, jumps & real)
        # every target is the next token of the same document, and every such next token is a target
        nxt = ids.roll(-1, 1)
        same_doc = (nxt == ids + 1) & real
        same_doc[:, -1] = False
        assert torch.equal(labels, torch.where(same_doc, nxt, torch.full_like(nxt, -100)))
    flat = SPDataLoader(docs, topo, 4, collate_fn=pack_collate, shuffle=False)  # batch of 4 documents -> 1 row
    local = next(iter(flat))
    pos = _gather_seq(local["position_ids"], topo)
    lengths = [5, 3, 2, 6] if topo.dp_rank == 0 else [17, 9, 11, 8]  # unshuffled: documents dp_rank::2
    assert pos.shape == (1, sum(lengths) + sum(lengths) % 2)
    assert pos[0, : sum(lengths)].tolist() == sum([list(range(n)) for n in lengths], [])


def _run_docs_alone(ref, ids, doc_lens):
    """Reference logits [B, S, V]: each document of each row run through the model on its own."""
    rows = []
    for row, lens in zip(ids, doc_lens):
        rows.append(torch.cat([ref(input_ids=d.unsqueeze(0)).logits[0] for d in row.split(lens)]))
    return torch.stack(rows)


def _local_loss(model, local, topo):
    logits = model(**{k: v for k, v in local.items() if k != "shift_labels"}).logits
    ce = F.cross_entropy(logits.flatten(0, 1).float(), local["shift_labels"].flatten(), reduction="sum")
    return logits, comm.all_reduce(ce.detach(), topo.sp_group)


def _check_parity(ctx, topo):
    tol = tolerances(ctx.dtype)
    model = tiny_model("tiny-llama", dtype=ctx.dtype).to(ctx.device)
    ref = clone(model)
    ulysses_sp.apply(model, topo)
    s_of = lambda S: slice(topo.sp_rank * S // 2, (topo.sp_rank + 1) * S // 2)  # noqa: E731
    with torch.no_grad():
        # plain batch, 13 tokens: padded to 14; reference = the non-SP model on the padded batch
        ids = tokens(2, 13, seed=40 + topo.dp_rank, device=ctx.device)
        local = shard_batch({"input_ids": ids, "labels": ids}, topo)
        logits, loss = _local_loss(model, local, topo)
        padded = torch.cat([ids, torch.zeros(2, 1, dtype=ids.dtype, device=ctx.device)], 1)
        torch.testing.assert_close(logits, ref(input_ids=padded).logits[:, s_of(14)], **tol)
        want = ref(input_ids=ids, labels=ids).loss.float() * 2 * 12  # HF mean over 2 x 12 targets
        torch.testing.assert_close(loss, want, **tol)

        # packed batch, 15 tokens: reference = every document run alone (padding joins each row's last)
        ids = tokens(2, 15, seed=50 + topo.dp_rank, device=ctx.device)
        seq_lens = [[4, 6, 5], [9, 6]]
        local = shard_batch({"input_ids": ids, "labels": ids, "seq_lens": seq_lens}, topo)
        logits, loss = _local_loss(model, local, topo)
        padded = torch.cat([ids, torch.zeros(2, 1, dtype=ids.dtype, device=ctx.device)], 1)
        alone = _run_docs_alone(ref, padded, [[4, 6, 6], [9, 7]])
        torch.testing.assert_close(logits, alone[:, s_of(16)], **tol)
        want = sum(
            ref(input_ids=d[None], labels=d[None]).loss.float() * (d.numel() - 1)
            for row, lens in zip(ids, seq_lens)
            for d in row.split(lens)
        )
        torch.testing.assert_close(loss, want, **tol)

        # right-padded rows with a 2-D mask: the valid tokens match the masked non-SP model
        ids = tokens(2, 11, seed=60 + topo.dp_rank, device=ctx.device)
        mask = torch.ones_like(ids)
        mask[1, 8:] = 0
        local = shard_batch({"input_ids": ids, "attention_mask": mask}, topo)
        logits = model(**local).logits
        full_mask = torch.cat([mask, torch.zeros(2, 1, dtype=mask.dtype, device=ctx.device)], 1)
        padded = torch.cat([ids, torch.zeros(2, 1, dtype=ids.dtype, device=ctx.device)], 1)
        want = ref(input_ids=padded, attention_mask=full_mask).logits[:, s_of(12)]
        valid = full_mask[:, s_of(12)].bool()
        torch.testing.assert_close(logits[valid], want[valid], **tol)


def _body(ctx):
    topo = ulysses_sp.init_sp(2)
    _check_sharding_and_coverage(ctx, topo)
    _check_resume(ctx, topo)
    _check_divergence(ctx, topo)
    _check_packing(ctx, topo)
    _check_parity(ctx, topo)
    check_vlm(ctx, topo)  # vision-language models: parity and their data path, here and at sp4
    check_vlm(ctx, ulysses_sp.init_sp(4))


def test_data_path_dp2_sp2():
    """One spawn (each costs ~15 s on 2 CPU cores): loader sharding and coverage, resume, divergence
    detection, packing, then logits/loss parity of an SP model fed shard_batch output; the VLMs'
    parity and data path (tests/distributed/core/test_vlm.py) at dp2 x sp2 and sp4."""
    harness.run(_body, 4)
