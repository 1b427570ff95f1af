"""SequenceInfo construction and the one masking rule, against brute-force definitions."""

import torch

from ulysses_sp.core import masks
from ulysses_sp.core.sequence_info import build_sequence_info, doc_ids_from_cu_seqlens


def _brute(doc, valid, causal, window, S, pos=None, chunk=None):
    """The rule of masks.py by its definition; ``pos`` [B, S] the position ids (chunks count them)."""
    out = torch.zeros(doc.shape[0], 1, S, S, dtype=torch.bool)
    for b in range(doc.shape[0]):
        for q in range(S):
            for k in range(S):
                ok = (k <= q) if causal else True
                if window is not None:
                    ok = ok and (q - k < window if causal else abs(q - k) < window)
                ok = ok and bool(doc[b, q] == doc[b, k])
                if chunk is not None:
                    ok = ok and bool(pos[b, q] // chunk == pos[b, k] // chunk)
                ok = ok and (bool(valid[b, k]) or q == k)
                out[b, 0, q, k] = ok
    return out


def test_plain_batch_gives_plain_info():
    pos = torch.arange(12).unsqueeze(0).expand(2, -1)
    info = build_sequence_info(pos)
    assert info.is_plain and info.seq_len == 12


def test_packed_positions_to_docs_and_cu_seqlens():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0, 1]])
    info = build_sequence_info(pos)
    assert info.doc_ids.tolist() == [[0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 0, 0, 0, 0, 1, 1]]
    assert info.cu_seqlens.tolist() == [0, 3, 5, 8, 14, 16]
    assert info.max_seqlen == 6 and info.valid_index is None


def test_cu_seqlens_input_matches_positions():
    cu = torch.tensor([0, 3, 5, 8, 14, 16], dtype=torch.int32)
    assert doc_ids_from_cu_seqlens(cu, 2, 8).tolist() == [[0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 0, 0, 0, 0, 1, 1]]
    info = build_sequence_info(cu_seqlens=cu, batch=2, seq_len=8)
    assert info.cu_seqlens.tolist() == cu.tolist()


def test_padding_mask_drops_pad_tokens_from_varlen():
    mask = torch.tensor([[1, 1, 0, 0, 1, 1], [0, 0, 1, 1, 1, 1]])
    info = build_sequence_info(torch.arange(6).expand(2, 6), mask)
    assert info.valid_index.tolist() == [0, 1, 4, 5, 8, 9, 10, 11]
    assert info.cu_seqlens.tolist() == [0, 4, 8]  # interior padding: one sequence of the valid tokens


def test_dense_mask_matches_brute_force():
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5, 6, 7]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1, 1]])
    info = build_sequence_info(pos, mask)
    for causal, window, chunk in [(c, w, None) for c in (True, False) for w in (None, 3)] + [(True, None, 3)]:
        got = masks.dense_mask(info, causal, window, "cpu", chunk)
        want = _brute(info.doc_ids, info.key_valid, causal, window, 8, pos, chunk)
        assert torch.equal(got.expand_as(want), want), (causal, window, chunk)
        rule = masks.mask_mod(info, causal, window, chunk)
        b, q, k = torch.meshgrid(torch.arange(2), torch.arange(8), torch.arange(8), indexing="ij")
        assert torch.equal(rule(b, 0, q, k), want[:, 0]), (causal, window, chunk)


def test_chunks_count_positions_from_each_document_start():
    """Chunked attention (Llama 4): packed documents restart their chunks; a plain batch chunks indices."""
    packed = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]])
    for pos in (packed, torch.arange(10).view(1, 10)):
        info = build_sequence_info(pos)
        want = _brute(
            info.doc_ids if info.doc_ids is not None else torch.zeros(1, 10), torch.ones(1, 10), True, None, 10, pos, 2
        )
        assert torch.equal(masks.dense_mask(info, True, None, "cpu", 2).expand_as(want), want)
        b, q, k = torch.meshgrid(torch.arange(1), torch.arange(10), torch.arange(10), indexing="ij")
        assert torch.equal(masks.mask_mod(info, True, None, 2)(b, 0, q, k), want[:, 0])


def test_gapped_marks_padding_inside_a_document_only():
    pos = torch.arange(8).repeat(2, 1)  # [2, 8]
    ends = torch.ones(2, 8, dtype=torch.long)
    ends[0, :3] = 0  # left padding
    ends[1, 6:] = 0  # right padding
    assert not build_sequence_info(pos, ends).gapped
    inside = torch.ones(2, 8, dtype=torch.long)
    inside[1, 3:5] = 0
    assert build_sequence_info(pos, inside).gapped
    packed = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]] * 2)  # two documents per row, padding between them
    between = torch.ones(2, 8, dtype=torch.long)
    between[:, 2:4] = 0  # the end of the first document
    assert not build_sequence_info(packed, between).gapped
