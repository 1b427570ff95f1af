"""apply/remove scoping, per-call behaviour (lengths, defaults, sp=1), compile, and setup errors."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.distributed as dist
import transformers

import ulysses_sp
from tests.distributed import harness
from tests.distributed.core.test_attention_parity import _check_parity
from tests.helpers import clone, tiny_model, tokens


def _shard(x, topo):
    s = x.shape[1] // topo.sp_size
    return x[:, topo.sp_rank * s : (topo.sp_rank + 1) * s]


def _body_scoping(ctx):
    topo = ulysses_sp.init_sp(2)
    model = tiny_model("tiny-llama").to(ctx.device)
    # a second model built from the *same* config object, and a third one from a copy
    shared = transformers.LlamaForCausalLM(model.config).to(ctx.device)
    other = clone(model)
    ids = tokens(2, 16, device=ctx.device)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        shared_before = shared(input_ids=ids).logits
        other_before = other(input_ids=ids).logits

    assert ulysses_sp.apply(model, topo) is model and ulysses_sp.is_applied(model)
    name = model.config._attn_implementation
    assert name.startswith("ulysses_sp_") and name in transformers.AttentionInterface._global_mapping
    assert shared.config._attn_implementation == "sdpa" and other.config._attn_implementation == "sdpa"
    for m in model.modules():  # every module sees the private config copy
        if isinstance(getattr(m, "config", None), transformers.PretrainedConfig):
            assert m.config._attn_implementation == name
    with torch.no_grad():
        torch.testing.assert_close(shared(input_ids=ids).logits, shared_before, rtol=0, atol=0)
        torch.testing.assert_close(other(input_ids=ids).logits, other_before, rtol=0, atol=0)
        sp_logits = model(input_ids=_shard(ids, topo)).logits  # position ids filled in by the hook
    torch.testing.assert_close(sp_logits, _shard(before, topo), rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="already applied"):
        ulysses_sp.apply(model, topo)
    ulysses_sp.remove(model)
    assert not ulysses_sp.is_applied(model)
    assert model.config._attn_implementation == "sdpa" and name not in transformers.AttentionInterface._global_mapping
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not applied"):
        ulysses_sp.remove(model)

    # a model freed without remove takes its name (and the attention holding the topology) with it
    ulysses_sp.apply(other, topo)
    name, attention = other.config._attn_implementation, weakref.ref(other._ulysses_sp.attention)
    assert name in transformers.AttentionInterface._global_mapping
    del other
    gc.collect()
    assert name not in transformers.AttentionInterface._global_mapping and attention() is None


def _body_calls(ctx):
    topo = ulysses_sp.init_sp(2)
    # the sequence length changes between steps without re-initialisation
    model = tiny_model("tiny-llama-gqa").to(ctx.device)
    ref = clone(model)
    ulysses_sp.apply(model, topo)
    for seq in (16, 24, 8, 40):
        ids = tokens(2, seq, seed=seq, device=ctx.device)
        with torch.no_grad():
            want = _shard(ref(input_ids=ids).logits, topo)
            got = model(input_ids=_shard(ids, topo)).logits
            ones = torch.ones_like(_shard(ids, topo))
            got_masked = model(input_ids=_shard(ids, topo), attention_mask=ones).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_masked, want, rtol=1e-5, atol=1e-5)
    # flex runs forward-only on CPU (torch has no CPU flex backward); full parity runs on GPU
    flex = tiny_model("tiny-mistral", attn="flex_attention").to(ctx.device)
    flex_ref = clone(flex)
    ulysses_sp.apply(flex, topo)
    ids = tokens(2, 32, device=ctx.device)
    with torch.no_grad():
        torch.testing.assert_close(
            flex(input_ids=_shard(ids, topo)).logits, _shard(flex_ref(input_ids=ids).logits, topo), rtol=1e-5, atol=1e-5
        )
    # wrong shapes are refused with the expected shape in the message
    with pytest.raises(ValueError, match=r"position_ids must be the local shard's global positions, \[B, 8\]"):
        model(input_ids=_shard(tokens(2, 16), topo), position_ids=torch.arange(16).unsqueeze(0))
    with pytest.raises(ValueError, match="KV caches"):
        model(input_ids=_shard(tokens(2, 16), topo), use_cache=True)


def _body_sp1_identity(ctx):
    topo = ulysses_sp.init_sp(1)  # dp = world: every rank holds whole sequences
    assert topo.sp_size == 1 and topo.dp_size == ctx.world_size and topo.dp_rank == ctx.rank
    _check_parity(ctx, topo, "tiny-llama-gqa", "sdpa")


def _body_compile(ctx):
    topo = ulysses_sp.init_sp(2)
    model = tiny_model("tiny-llama-gqa").to(ctx.device)
    ulysses_sp.apply(model, topo)
    layer = model.model.layers[0]
    B, s = 2, 8
    h = torch.randn(B, s, model.config.hidden_size, generator=torch.Generator().manual_seed(3 + ctx.rank))
    h = h.to(ctx.device).requires_grad_(True)
    pos = torch.arange(topo.sp_rank * s, (topo.sp_rank + 1) * s, device=ctx.device).unsqueeze(0).expand(B, -1)
    kwargs = dict(
        position_embeddings=model.model.rotary_emb(h, pos),
        position_ids=pos,
        ulysses_sp_info=ulysses_sp.SequenceInfo(s * topo.sp_size),
    )
    layer(h, **kwargs).pow(2).sum().backward()
    eager = [p.grad.clone() for p in layer.parameters()] + [h.grad.clone()]
    layer.zero_grad()
    h.grad = None
    torch._dynamo.reset()
    explained = torch._dynamo.explain(layer)(h, **kwargs)
    assert explained.graph_break_count == 0, explained.break_reasons
    backend = "inductor" if harness.on_gpu() else "aot_eager"  # inductor on CPU costs ~30 s of CI
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    compiled(h, **kwargs).pow(2).sum().backward()
    got = [p.grad for p in layer.parameters()] + [h.grad]
    for a, b in zip(eager, got):
        assert torch.count_nonzero(b) > 0, "compiled backward produced zero gradients"
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    # the whole model, with the step's info passed in, also compiles without a graph break
    ids = _shard(tokens(B, s * topo.sp_size, device=ctx.device), topo)
    whole = torch._dynamo.explain(model)(
        input_ids=ids, position_ids=pos, ulysses_sp_info=ulysses_sp.SequenceInfo(s * topo.sp_size)
    )
    assert whole.graph_break_count == 0, whole.break_reasons


def _body_errors(ctx):
    with pytest.raises(ValueError, match=r"world size 2 is not a multiple of sp_size=3; use one of \[1, 2\]"):
        ulysses_sp.init_sp(3)
    with pytest.raises(ValueError, match=r"sp_size must be an integer >= 1, got 0"):
        ulysses_sp.init_sp(0)
    topo = ulysses_sp.init_sp(2)
    with pytest.raises(ValueError, match="sp_size=2 exceeds num_attention_heads=1"):
        ulysses_sp.apply(tiny_model("tiny-llama", num_attention_heads=1, num_key_value_heads=1, hidden_size=16), topo)
    with pytest.raises(ValueError, match=r"attention implementation 'paged\|eager' is not supported"):
        ulysses_sp.apply(tiny_model("tiny-llama"), topo, attn_implementation="paged|eager")
    dist.barrier()


def test_scoping_and_remove():
    harness.run(_body_scoping, 2)


def test_calls_lengths_defaults_and_flex_forward():
    harness.run(_body_calls, 2)


def test_sp1_is_identity():
    harness.run(_body_sp1_identity, 2)


def test_compile_no_graph_breaks_and_eager_grads():
    harness.run(_body_compile, 2)


def test_setup_errors():
    harness.run(_body_errors, 2)
