"""Every backend's masking over the full sequence (no communication: what runs after the
all-to-all), against a brute-force softmax attention; and the mask arguments the model hook and
``apply`` accept or refuse."""

from types import SimpleNamespace

import pytest
import torch

import ulysses_sp
from tests.helpers import small_model
from ulysses_sp.core import backends, masks
from ulysses_sp.core.model_inputs import complete_kwargs
from ulysses_sp.core.sequence_info import SEQ_INFO_KWARG, SequenceInfo, build_sequence_info

B, S, NQ, NK, H = 2, 24, 4, 2, 8
CPU_BACKENDS = ("sdpa", "eager", "flex_attention")


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, S, NQ, H, generator=g),
        torch.randn(B, S, NK, H, generator=g),
        torch.randn(B, S, NK, H, generator=g),
    )  # [B, S, n, H]


def _reference(q, k, v, allowed):
    """Softmax attention over ``allowed`` [B|1, 1|NQ, S, S] (bool) or an additive float mask."""
    k, v = (t.repeat_interleave(NQ // NK, dim=2).transpose(1, 2) for t in (k, v))  # [B, NQ, S, H]
    scores = q.transpose(1, 2) @ k.transpose(2, 3) * H**-0.5  # [B, NQ, S, S]
    scores = scores.masked_fill(~allowed, float("-inf")) if allowed.dtype == torch.bool else scores + allowed
    return (scores.softmax(-1) @ v).transpose(1, 2)  # [B, S, NQ, H]


def _spec(info, window=None, custom=None, chunk=None):
    return backends.AttnSpec(
        causal=True, scale=H**-0.5, dropout=0.0, window=window, softcap=None, info=info, custom_mask=custom, chunk=chunk
    )


def _layout():
    """Row 0: documents of 5, 11, 8 tokens; row 1: left padding (4) and interior padding (3)."""
    pos = torch.cat([torch.arange(5), torch.arange(11), torch.arange(8)]).view(1, S)
    pos = torch.cat([pos, torch.arange(S).view(1, S)])  # [B, S]
    valid = torch.ones(B, S, dtype=torch.long)
    valid[1, :4] = 0
    valid[1, 12:15] = 0
    return build_sequence_info(pos, valid), valid.bool()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_packed_padded_windowed_match_brute_force(backend):
    info, valid = _layout()
    q, k, v = _qkv()
    for window in (None, 6):
        allowed = masks.dense_mask(info, True, window, "cpu")  # checked against brute force in test_positions_masks
        with torch.no_grad():
            got = backends.run(backend, q, k, v, _spec(info, window))
        torch.testing.assert_close(got[valid], _reference(q, k, v, allowed)[valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_custom_masks_match_brute_force(backend):
    q, k, v = _qkv(1)
    qi, ki = torch.arange(S).view(S, 1), torch.arange(S).view(1, S)
    prefix = torch.tensor([6, 15]).view(B, 1, 1, 1)
    keep = (ki <= qi) | ((qi < prefix) & (ki < prefix))  # [B, 1, S, S] prefix-LM
    bias = torch.randn(B, NQ, S, S, generator=torch.Generator().manual_seed(2))
    additive = torch.where(ki <= qi, bias, torch.finfo(torch.float32).min)  # [B, NQ, S, S]
    for mask in (keep, additive):
        with torch.no_grad():
            got = backends.run(backend, q, k, v, _spec(SequenceInfo(S), custom=mask))
        torch.testing.assert_close(got, _reference(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_flex_takes_a_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    q, k, v = _qkv(2)
    block = create_block_mask(lambda b, h, qi, ki: (ki <= qi) & (qi - ki < 5), None, None, S, S, device="cpu")
    with torch.no_grad():
        got = backends.run("flex_attention", q, k, v, _spec(SequenceInfo(S), custom=block))
    allowed = masks.dense_mask(SequenceInfo(S), True, 5, "cpu")
    torch.testing.assert_close(got, _reference(q, k, v, allowed), rtol=1e-5, atol=1e-5)


def test_flash_refuses_custom_masks_before_needing_flash_attn():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="flash-attention cannot take a dense"):
        backends.run("flash_attention_2", q, k, v, _spec(SequenceInfo(S), custom=torch.ones(1, 1, S, S).bool()))


def _flash_one(q, k, v, softmax_scale, causal, window_size, softcap=0.0):
    """flash-attn's documented semantics for one sequence [L, n, H]: GQA by head groups, key j seen
    by query i when causal gives j <= i and the window (left, right) gives i - left <= j <= i + right
    (-1: unbounded)."""
    nq, nk, L = q.shape[1], k.shape[1], q.shape[0]
    k, v = (t.repeat_interleave(nq // nk, dim=1).float() for t in (k, v))  # [L, nq, H]
    scores = torch.einsum("qnh,knh->nqk", q.float(), k) * softmax_scale  # [nq, L, L]
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    i, j = torch.arange(L).view(L, 1), torch.arange(L).view(1, L)
    seen = (j <= i) if causal else torch.ones(L, L, dtype=torch.bool)
    left, right = window_size
    if left >= 0:
        seen &= j >= i - left
    if right >= 0:
        seen &= j <= i + right
    probs = scores.masked_fill(~seen, float("-inf")).softmax(-1)
    return torch.einsum("nqk,knh->qnh", probs, v).to(q.dtype)  # [L, nq, H]


def _fake_flash(version):
    """CPU stand-ins with flash-attn 2's and 3's signatures (3: no dropout_p, returns (out, lse))."""

    def finish(out):
        return (out, None) if version == 3 else out

    def func(q, k, v, softmax_scale, causal, window_size, softcap=0.0, **dropout):  # [B, S, n, H]
        assert set(dropout) == ({"dropout_p"} if version == 2 else set()), dropout
        assert q.dtype == torch.bfloat16
        return finish(torch.stack([_flash_one(*t, softmax_scale, causal, window_size, softcap) for t in zip(q, k, v)]))

    def varlen_func(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale,
        causal,
        window_size,
        softcap=0.0,
        **dropout,
    ):  # [T, n, H]
        assert set(dropout) == ({"dropout_p"} if version == 2 else set()), dropout
        assert cu_seqlens_q.dtype == torch.int32 and torch.equal(cu_seqlens_q, cu_seqlens_k)
        lens = cu_seqlens_q.diff()
        assert int(cu_seqlens_q[-1]) == q.shape[0] and max_seqlen_q == max_seqlen_k == int(lens.max())
        out = torch.cat(
            [
                _flash_one(q[a:b], k[a:b], v[a:b], softmax_scale, causal, window_size, softcap)
                for a, b in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist())
            ]
        )
        return finish(out)

    return func, varlen_func


@pytest.mark.parametrize("version", [2, 3])
def test_flash_call_contract_on_cpu(version, monkeypatch):
    """What we hand flash-attn (varlen cu_seqlens from the step's info, valid tokens only, window
    size, scale; no dropout argument for flash 3; a tuple result) against brute force, through
    CPU stand-ins with the kernels' signatures: the plain causal path, packed documents with padding
    at the ends (with and without a window) and interior padding (without)."""
    monkeypatch.setattr(backends.flash, "flash_functions", _fake_flash)
    ends = torch.cat(
        [torch.cat([torch.arange(5), torch.arange(11), torch.arange(8)]).view(1, S), torch.arange(S).view(1, S)]
    )  # [B, S]
    valid_ends = torch.ones(B, S, dtype=torch.long)
    valid_ends[1, :4] = 0
    valid_ends[1, -3:] = 0
    interior, valid_interior = _layout()
    cases = [
        (SequenceInfo(S), torch.ones(B, S, dtype=torch.bool), (None, 6)),
        (build_sequence_info(ends, valid_ends), valid_ends.bool(), (None, 6)),
        (interior, valid_interior, (None,)),
    ]
    q, k, v = (t.bfloat16().float() for t in _qkv(3))  # exact in bf16: the kernels' precision
    for info, valid, windows in cases:
        for window in windows:
            with torch.no_grad():
                got = backends.run(f"flash_attention_{version}", q, k, v, _spec(info, window))
            assert got.dtype == torch.float32
            want = _reference(q, k, v, masks.dense_mask(info, True, window, "cpu"))
            torch.testing.assert_close(
                got[valid],
                want[valid],
                rtol=1e-2,
                atol=1e-2,
                msg=lambda m: f"window {window}, plain {info.is_plain}: {m}",
            )
            assert not got[~valid].any(), "padding queries must read nothing"


def test_flash_refuses_a_window_across_interior_padding():
    """Varlen drops padding: across an interior gap the window's distances would shrink (silently
    wrong), so flash refuses; the same batch without a window, or sdpa with it, is fine."""
    info, _ = _layout()  # row 1 has interior padding
    assert info.gapped
    with pytest.raises(ValueError, match=r"sliding window \(4 tokens\) across padding inside a sequence"):
        backends.run("flash_attention_2", *_qkv(), _spec(info, window=4))
    backends.run("sdpa", *_qkv(), _spec(info, window=4))


def test_dense_fallback_warns_above_the_limit(monkeypatch):
    info, _ = _layout()
    monkeypatch.setattr(backends.dense, "DENSE_MASK_WARN_TOKENS", S - 1)
    with pytest.warns(UserWarning, match=f"dense {S}x{S} attention mask"):
        backends.run("sdpa", *_qkv(), _spec(info))


# --- masks given to the model: the pre-hook and apply ---------------------------------------------

_P1 = SimpleNamespace(sp_size=1, sp_rank=0, sp_group=None)


def _call(**kwargs):
    return complete_kwargs({"input_ids": torch.zeros(B, S, dtype=torch.long), **kwargs}, _P1)


def test_hook_normalises_3d_masks_and_refuses_ambiguous_ones():
    keep = torch.ones(B, S, S, dtype=torch.long).tril()
    out = _call(attention_mask=keep)
    assert out["attention_mask"].shape == (B, 1, S, S) and out["attention_mask"].dtype == torch.bool
    assert torch.equal(out["attention_mask"][:, 0], keep.bool())
    four_d = torch.zeros(B, 1, S, S)
    assert _call(attention_mask=four_d)["attention_mask"] is four_d
    with pytest.raises(ValueError, match="3-D float attention_mask is ambiguous"):
        _call(attention_mask=keep.float())
    with pytest.raises(ValueError, match=r"attention_mask must be 2-D \[B, S/P\] \(padding\)"):
        _call(attention_mask=torch.ones(S))


def test_hook_folds_a_2d_mask_and_never_drops_a_layout():
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, :3] = 0
    out = _call(attention_mask=mask)
    assert out["attention_mask"] is None and torch.equal(out[SEQ_INFO_KWARG].key_valid, mask.bool())
    with pytest.raises(ValueError, match="already describes the padding; give the full"):
        _call(attention_mask=mask, **{SEQ_INFO_KWARG: SequenceInfo(S)})
    with pytest.raises(ValueError, match="cu_seq_lens_q was passed to the model; .* to ulysses_sp.shard_batch"):
        _call(cu_seq_lens_q=torch.tensor([0, S], dtype=torch.int32))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_chunked_attention_matches_brute_force(backend):
    """Chunks of 4 positions (Llama 4) on a plain batch and on packed + padded rows (chunks restart
    with each document); the mask itself is checked by definition in test_sequence_info.py."""
    packed, valid = _layout()
    q, k, v = _qkv(3)
    for info, rows in ((SequenceInfo(S), torch.ones(B, S, dtype=torch.bool)), (packed, valid)):
        allowed = masks.dense_mask(info, True, None, "cpu", 4)
        with torch.no_grad():
            got = backends.run(backend, q, k, v, _spec(info, chunk=4))
        torch.testing.assert_close(got[rows], _reference(q, k, v, allowed)[rows], rtol=1e-5, atol=1e-5)


def test_chunked_attention_is_refused_on_flash():
    model = small_model(
        "Llama4TextConfig",
        intermediate_size_mlp=64,
        num_hidden_layers=4,
        head_dim=8,
        attention_chunk_size=8,
        num_local_experts=2,
    )
    with pytest.raises(
        ValueError, match=r"chunked-attention layers \(attention_chunk_size=8\).* not on flash_attention_2"
    ):
        ulysses_sp.apply(model, SimpleNamespace(sp_size=2, sp_rank=0), "flash_attention_2")
    assert not ulysses_sp.is_applied(model)


# --- attention sinks (s_aux, GPT-OSS) -----------------------------------------------------------


def _sink_reference(q, k, v, allowed, sinks):
    """Softmax attention with one more logit per query, the head's sink, dropped after the softmax."""
    k, v = (t.repeat_interleave(NQ // NK, dim=2).transpose(1, 2) for t in (k, v))  # [B, NQ, S, H]
    scores = (q.transpose(1, 2) @ k.transpose(2, 3) * H**-0.5).masked_fill(~allowed, float("-inf"))
    sink = sinks.view(1, NQ, 1, 1).expand(*scores.shape[:3], 1)  # [B, NQ, S, 1]
    probs = torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1]
    return (probs @ v).transpose(1, 2)  # [B, S, NQ, H]


@pytest.mark.parametrize("backend", backends.SINK_BACKENDS)
def test_sinks_match_brute_force(backend):
    """Packed, padded and windowed rows with sinks (flex forward only: no flex backward on CPU)."""
    info, valid = _layout()
    q, k, v = _qkv(4)
    sinks = torch.randn(NQ, generator=torch.Generator().manual_seed(5))
    for window in (None, 6):
        allowed = masks.dense_mask(info, True, window, "cpu")
        spec = _spec(info, window)
        spec.sinks = sinks
        with torch.no_grad():
            got = backends.run(backend, q, k, v, spec)
        torch.testing.assert_close(got[valid], _sink_reference(q, k, v, allowed, sinks)[valid], rtol=1e-5, atol=1e-5)


def test_apply_sinks_gradients():
    """flex's route: attention without sinks and its log-sum-exp, renormalised by apply_sinks, gives
    the output and the q/k/v/sink gradients of softmax attention with a sink column (the lse path
    carries part of every gradient)."""
    info, _ = _layout()
    allowed = masks.dense_mask(info, True, None, "cpu")[:1]  # row 0: packed documents, every query sees a key
    q, k, v = (t[:1].double().requires_grad_() for t in _qkv(6))
    sinks = torch.randn(NQ, dtype=torch.float64, requires_grad=True)
    kk, vv = (t.repeat_interleave(NQ // NK, dim=2).transpose(1, 2) for t in (k, v))
    scores = (q.transpose(1, 2) @ kk.transpose(2, 3) * H**-0.5).masked_fill(~allowed, float("-inf"))
    out = scores.softmax(-1) @ vv  # [1, NQ, S, H]
    got = backends.flex.apply_sinks(out, torch.logsumexp(scores, -1), sinks).transpose(1, 2)
    want = _sink_reference(q, k, v, allowed, sinks)
    weights = torch.randn_like(want)
    grads_got = torch.autograd.grad((got * weights).sum(), (q, k, v, sinks))
    grads_want = torch.autograd.grad((want * weights).sum(), (q, k, v, sinks))
    tol = dict(rtol=1e-5, atol=1e-6)  # apply_sinks computes in fp32
    torch.testing.assert_close(got, want, **tol)
    for name, a, b in zip(("q", "k", "v", "sinks"), grads_got, grads_want):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("backend", ["sdpa", "flash_attention_2", "flash_attention_3"])
def test_sinks_refused_where_not_applied(backend):
    q, k, v = _qkv()
    spec = _spec(SequenceInfo(S))
    spec.sinks = torch.zeros(NQ)
    with pytest.raises(ValueError, match=rf"attention sinks .* eager and flex_attention only, not on {backend}"):
        backends.run(backend, q, k, v, spec)
