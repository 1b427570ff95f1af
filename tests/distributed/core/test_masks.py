"""Masks under SP, end to end through transformers models, against non-SP references:
packed documents (outputs and gradients equal those of each document run alone), sliding windows at
lengths above the window, 2-D padding masks (left and interior), custom 3-D/4-D masks, and compile
(graph-break counts, compiled gradients equal eager ones).

CPU (gloo): sdpa and eager with gradients; flex forward-only (torch has no CPU flex backward).
GPU (ULYSSES_SP_TEST_BACKEND=nccl): the same bodies with flex gradients too, plus the gpu-marked
tests: flash_attention_2/3, and sdpa's memory-safe routes (torch varlen, flex) for masked batches.
Each spawn costs seconds, so the checks are grouped into few of them.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import ulysses_sp
from tests.distributed import harness
from tests.helpers import assert_grads_close, tiny_model, tokens, tolerances
from ulysses_sp.core import backends, comm
from ulysses_sp.core.sequence_info import SEQ_INFO_KWARG
from ulysses_sp.core.sharding import shard_batch
from ulysses_sp.train.presets import build_config

LENS = [[5, 14, 13], [20, 12]]  # documents of the two rows of a 32-token batch; 14 > both windows (12, 10)


def _with_grads(backend: str) -> bool:
    return backend != "flex_attention" or harness.on_gpu()


def _tol(ctx, backend: str) -> dict:
    """tests.helpers bounds; flash kernels run in bf16 whatever the model dtype. fp32: 1e-4, since
    the loss sums B*S*V weighted logits (gradients of order 1) and the references (documents run
    alone, another kernel) sum over the tokens in another order: measured differences reach 2e-5."""
    if backend.startswith("flash") or ctx.dtype == torch.bfloat16:
        return tolerances(torch.bfloat16)
    return {"rtol": 1e-4, "atol": 1e-4}


def _flex_head_dim(preset: str, backend: str) -> dict:
    """``head_dim=16`` where flex runs on CUDA (flex_attention, or sdpa routed to flex by a dense-mask
    limit of 0) and the preset's heads are narrower: the compiled kernel's minimum."""
    config = build_config(preset)
    flex = backend == "flex_attention" or (backend == "sdpa" and backends.dense.DENSE_MASK_WARN_TOKENS == 0)
    if flex and harness.on_gpu() and config.hidden_size // config.num_attention_heads < 16:
        return {"head_dim": 16}
    return {}


def _models(ctx, preset: str, backend: str, **overrides):
    """(SP model on ``backend``, non-SP sdpa reference): the same weights (same seed). Compiled flex
    on CUDA needs head_dim >= 16: the 8-dim GQA preset gets 16 there."""
    overrides = {**_flex_head_dim(preset, backend), **overrides}
    model = tiny_model(preset, attn=backend, dtype=ctx.dtype, **overrides).to(ctx.device)
    ref = tiny_model(preset, attn="sdpa", dtype=ctx.dtype, **overrides).to(ctx.device)
    return model, ref


def _weights(shape, seed: int, ctx) -> torch.Tensor:
    """Fixed random loss weights [B, S, V], identical on every rank of an SP group."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(ctx.device, ctx.dtype)


def _local(x: torch.Tensor, topo) -> torch.Tensor:
    s = x.shape[1] // topo.sp_size
    return x[:, topo.sp_rank * s : (topo.sp_rank + 1) * s]


def _compare(ctx, topo, model, ref, backend, got, want, weights, *, ref_loss=None, valid=None, what=""):
    """Local logits against the reference's slice (valid positions only), then every parameter's
    gradient (summed over the SP group) against the reference's; the loss is sum(logits * weights)
    (the reference's: ``ref_loss``, by default from ``want``)."""
    tol = _tol(ctx, backend)
    want_local = _local(want, topo).detach()
    mask = torch.ones(got.shape[:2], dtype=torch.bool, device=got.device) if valid is None else _local(valid, topo)
    what = f"{what} {model.config.model_type}/{backend}"
    torch.testing.assert_close(got[mask], want_local[mask], **tol, msg=lambda m: f"{what} logits: {m}")
    if not _with_grads(backend):
        return
    (ref_loss if ref_loss is not None else (want.float() * weights).sum()).backward()
    w = _local(weights, topo) * mask[..., None]
    (got.float() * w).sum().backward()
    for p in model.parameters():
        if p.grad is not None:
            p.grad = comm.all_reduce(p.grad, topo.sp_group)
    assert_grads_close(model, ref, **tol)


def _alone(ref, ids, lens):
    """Logits [B, S, V] of every document of every row run through the model on its own."""
    rows = [torch.cat([ref(input_ids=d[None]).logits[0] for d in row.split(n)]) for row, n in zip(ids, lens)]
    return torch.stack(rows)


def _check_packed(ctx, topo, preset, backend, layout):
    """Packed rows: each document alone is the reference (``layout``: how SP learns the documents)."""
    model, ref = _models(ctx, preset, backend)
    ulysses_sp.apply(model, topo)
    ids = tokens(2, 32, seed=11 + topo.dp_rank, device=ctx.device)
    weights = _weights((2, 32, model.config.vocab_size), 5 + topo.dp_rank, ctx)
    with torch.set_grad_enabled(_with_grads(backend)):
        want = _alone(ref, ids, LENS)
        ref_loss = (want.float() * weights).sum()
        if layout == "positions":  # position ids that restart per document; the hook gathers them
            pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in LENS]).to(ctx.device)
            got = model(input_ids=_local(ids, topo), position_ids=_local(pos, topo)).logits
        else:
            batch = {"input_ids": ids}
            if layout == "seq_lens":
                batch["seq_lens"] = LENS
            else:
                lengths = torch.tensor([0] + [n for row in LENS for n in row])
                batch["cu_seqlens"] = lengths.cumsum(0).to(torch.int32)  # over B*S: [0, 5, 19, 32, 52, 64]
            got = model(**shard_batch(batch, topo)).logits
        _compare(ctx, topo, model, ref, backend, got, want, weights, ref_loss=ref_loss, what=f"packed {layout}")


def _check_window(ctx, topo, preset, backend):
    """A plain 32-token batch, longer than the window: the non-SP model with its window is the reference."""
    model, ref = _models(ctx, preset, backend)
    ulysses_sp.apply(model, topo)
    ids = tokens(2, 32, seed=21 + topo.dp_rank, device=ctx.device)
    weights = _weights((2, 32, model.config.vocab_size), 6 + topo.dp_rank, ctx)
    with torch.set_grad_enabled(_with_grads(backend)):
        want = ref(input_ids=ids).logits
        got = model(input_ids=_local(ids, topo)).logits
        _compare(ctx, topo, model, ref, backend, got, want, weights, what="window")


def _check_window_matters(ctx, preset):
    """Guard against a vacuous window test: at 32 tokens the window changes the output."""
    windowed = tiny_model(preset).to(ctx.device)
    full = tiny_model(preset, sliding_window=64).to(ctx.device)  # longer than the batch: no window
    ids = tokens(1, 32, device=ctx.device)
    with torch.no_grad():
        assert not torch.allclose(windowed(input_ids=ids).logits, full(input_ids=ids).logits, atol=1e-3), preset


def _padding_mask(ctx, interior: bool = True):
    mask = torch.ones(2, 32, dtype=torch.long, device=ctx.device)
    mask[0, :5] = 0  # left padding
    if interior:
        mask[1, 10:14] = 0
    else:
        mask[1, 27:] = 0  # right padding
    return mask


def _check_padding(ctx, topo, preset, backend):
    """A 2-D padding mask, given to the model per shard (the hook gathers it) and to shard_batch in
    full; non-pad positions and all gradients (pad positions carry no loss) equal the masked non-SP
    model's. Flash with a sliding window: interior padding refused, padding at the ends checked."""
    model, ref = _models(ctx, preset, backend)
    ulysses_sp.apply(model, topo)
    ids = tokens(2, 32, seed=31 + topo.dp_rank, device=ctx.device)
    mask = _padding_mask(ctx)
    if backend.startswith("flash") and getattr(model.config, "sliding_window", None):
        # varlen drops the padding: a window across an interior gap is refused, padding at the ends is not
        with pytest.raises(ValueError, match="across padding inside a sequence"), torch.no_grad():
            model(input_ids=_local(ids, topo), attention_mask=_local(mask, topo))
        mask = _padding_mask(ctx, interior=False)
    valid = mask.bool()
    weights = _weights((2, 32, model.config.vocab_size), 7 + topo.dp_rank, ctx)
    with torch.set_grad_enabled(_with_grads(backend)):
        want = ref(input_ids=ids, attention_mask=mask).logits
        ref_loss = torch.where(valid[..., None], want.float() * weights, 0).sum()
        got = model(input_ids=_local(ids, topo), attention_mask=_local(mask, topo)).logits
        _compare(ctx, topo, model, ref, backend, got, want, weights, ref_loss=ref_loss, valid=valid, what="padding")
    with torch.no_grad():
        got = model(**shard_batch({"input_ids": ids, "attention_mask": mask}, topo)).logits
        local_valid = _local(valid, topo)
        torch.testing.assert_close(got[local_valid], _local(want, topo)[local_valid], **_tol(ctx, backend))


def _custom_masks(ctx, S, heads):
    """A 3-D bool prefix-LM mask [B, S, S] (True = attend) and a 4-D additive per-head mask
    [B, heads, S, S] (causal with a random bias on the allowed entries)."""
    q = torch.arange(S, device=ctx.device).view(S, 1)
    k = torch.arange(S, device=ctx.device).view(1, S)
    prefix = torch.tensor([7, 13], device=ctx.device).view(2, 1, 1)
    keep = (k <= q) | ((q < prefix) & (k < prefix))  # [2, S, S]
    bias = torch.randn(2, heads, S, S, generator=torch.Generator().manual_seed(9)).to(ctx.device, ctx.dtype) * 0.5
    additive = torch.where(k <= q, bias, torch.finfo(ctx.dtype).min)  # [2, heads, S, S]
    return keep, additive


def _check_custom(ctx, topo, preset, backend):
    """Custom full-sequence masks: 3-D [B, S, S] and per-head 4-D [B, N, S, S] given to the model,
    and a 3-D one through shard_batch (29 tokens: padded to a multiple of sp)."""
    model, ref = _models(ctx, preset, backend)
    ulysses_sp.apply(model, topo)
    heads = model.config.num_attention_heads
    ids = tokens(2, 32, seed=41 + topo.dp_rank, device=ctx.device)
    weights = _weights((2, 32, model.config.vocab_size), 8 + topo.dp_rank, ctx)
    keep, additive = _custom_masks(ctx, 32, heads)
    if backend.startswith("flash"):
        with pytest.raises(ValueError, match="flash-attention cannot take a dense"):
            model(input_ids=_local(ids, topo), attention_mask=keep)
        return
    for name, mask, ref_mask in (("3-D bool", keep, keep[:, None]), ("4-D additive", additive, additive)):
        ref.zero_grad()
        model.zero_grad()
        with torch.set_grad_enabled(_with_grads(backend)):
            want = ref(input_ids=ids, attention_mask=ref_mask).logits
            got = model(input_ids=_local(ids, topo), attention_mask=mask).logits
            _compare(ctx, topo, model, ref, backend, got, want, weights, what=f"custom {name}")
    keep29, _ = _custom_masks(ctx, 29, heads)
    with torch.no_grad():
        want = ref(input_ids=ids[:, :29], attention_mask=keep29[:, None]).logits
        local = shard_batch({"input_ids": ids[:, :29], "attention_mask": keep29}, topo)
        got = model(**local).logits  # [B, s, V] of the padded sequence
        s = got.shape[1]
        real = min(29 - topo.sp_rank * s, s)
        start = topo.sp_rank * s
        torch.testing.assert_close(got[:, :real], want[:, start : start + real], **_tol(ctx, backend))


def _run_checks(ctx, topo, backend, packed, windowed, padding=True, custom=True):
    for preset, layout in packed:
        _check_packed(ctx, topo, preset, backend, layout)
    for preset in windowed:
        _check_window(ctx, topo, preset, backend)
    if padding:
        _check_padding(ctx, topo, "tiny-mistral", backend)
    if custom:
        _check_custom(ctx, topo, "tiny-llama-gqa", backend)


# how SP learns the documents (seq_lens / cu_seqlens to shard_batch, or restarting position ids the
# hook gathers) is backend-independent; every backend gets packing combined with a sliding window
PACKED_ALL = [("tiny-mistral", "seq_lens"), ("tiny-qwen2-mixed-window", "cu_seqlens"), ("tiny-llama-gqa", "positions")]
PACKED_ONE = [("tiny-mistral", "seq_lens")]
WINDOWED = ["tiny-mistral", "tiny-qwen2-mixed-window"]


def _body_sp4_dp2xsp2(ctx, backends_to_run):
    """sp=4: every check (the SequenceInfo layouts on the first backend only); then dp2 x sp2 on the
    same processes: packed documents, padding and the mixed-window model on the first backend."""
    topo = ulysses_sp.init_sp(4)
    for i, backend in enumerate(backends_to_run):
        _run_checks(ctx, topo, backend, PACKED_ALL if i == 0 else PACKED_ONE, WINDOWED if i == 0 else WINDOWED[1:])
    _check_window_matters(ctx, "tiny-mistral")
    _check_window_matters(ctx, "tiny-qwen2-mixed-window")
    topo = ulysses_sp.init_sp(2)
    _run_checks(ctx, topo, backends_to_run[0], PACKED_ONE, WINDOWED[1:], custom=False)


def _body_sp2(ctx, backend):
    """sp=2, every check: the variant of the sp4 body for a 2-GPU node."""
    _run_checks(ctx, ulysses_sp.init_sp(2), backend, PACKED_ALL, WINDOWED)


def test_masks_sp4_and_dp2xsp2():
    """sdpa, eager, flex: packed, sliding windows, padding, custom masks at sp=4, and dp2 x sp2."""
    harness.run(_body_sp4_dp2xsp2, 4, ["sdpa", "eager", "flex_attention"])


# --- compile -------------------------------------------------------------------------------------


def _compile_backend() -> str:
    # graph breaks are counted by dynamo whatever the backend; aot_eager runs AOTAutograd (where a
    # collective's autograd can go wrong under compile) without Inductor's minutes of codegen per
    # check. Inductor itself is exercised by test_apply's compile test on GPU.
    return "aot_eager"


def _grads(module, *extra):
    return [p.grad.clone() for p in module.parameters() if p.grad is not None] + [t.grad.clone() for t in extra]


def _check_compile_layer(ctx, topo, backend):
    """One decoder layer on a packed, windowed batch: no graph break; compiled outputs (and grads)
    equal eager ones."""
    preset = "tiny-mistral"
    model = tiny_model(preset, attn=backend, dtype=ctx.dtype, **_flex_head_dim(preset, backend)).to(ctx.device)
    ulysses_sp.apply(model, topo)
    batch = {"input_ids": tokens(2, 32, device=ctx.device), "seq_lens": LENS}
    layer, pos = model.model.layers[0], shard_batch(batch, topo)["position_ids"]
    h = torch.randn(2, pos.shape[1], model.config.hidden_size, generator=torch.Generator().manual_seed(3 + ctx.rank))
    h = h.to(ctx.device, ctx.dtype).requires_grad_(_with_grads(backend))

    def kwargs():  # a fresh SequenceInfo each call: its masks are then built inside the compiled graph
        return {
            "position_embeddings": model.model.rotary_emb(h, pos),
            "position_ids": pos,
            SEQ_INFO_KWARG: shard_batch(batch, topo)[SEQ_INFO_KWARG],
        }

    torch._dynamo.reset()
    explained = torch._dynamo.explain(layer)(h, **kwargs())
    assert explained.graph_break_count == 0, (backend, explained.break_reasons)
    eager_out = layer(h, **kwargs())
    compiled_out = torch.compile(layer, fullgraph=True, backend=_compile_backend())(h, **kwargs())
    torch.testing.assert_close(compiled_out, eager_out, **_tol(ctx, backend))
    if not _with_grads(backend):
        return
    eager_out.pow(2).sum().backward()
    eager = _grads(layer, h)
    layer.zero_grad()
    h.grad = None
    compiled_out.pow(2).sum().backward()
    for a, b in zip(eager, _grads(layer, h)):
        assert torch.count_nonzero(b) > 0, "compiled backward produced zero gradients"
        torch.testing.assert_close(b, a, **_tol(ctx, backend))


def _compile_model_setup(ctx, topo, backend):
    preset = "tiny-qwen2-mixed-window"
    model = tiny_model(preset, attn=backend, dtype=ctx.dtype, **_flex_head_dim(preset, backend)).to(ctx.device)
    ulysses_sp.apply(model, topo)
    ids = tokens(2, 32, device=ctx.device)
    padded = _padding_mask(ctx, interior=not backend.startswith("flash"))  # flash: no window across a gap
    return model, {"input_ids": ids, "seq_lens": LENS}, {"input_ids": ids, "attention_mask": padded}


def _check_compile_model(ctx, topo, backend):
    """The whole model (full and sliding layers) on packed and padded batches from shard_batch: no
    graph break."""
    model, packed, padded = _compile_model_setup(ctx, topo, backend)
    for batch in (packed, padded):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(**shard_batch(batch, topo))
        assert explained.graph_break_count == 0, (backend, sorted(batch), explained.break_reasons)


def _check_compile_no_info(ctx, topo, backend):
    """Without the step's SequenceInfo the hook gathers it: that gather is the only break site."""
    model, packed, _ = _compile_model_setup(ctx, topo, backend)
    torch._dynamo.reset()
    no_info = {k: v for k, v in shard_batch(packed, topo).items() if k != SEQ_INFO_KWARG}
    explained = torch._dynamo.explain(model)(**no_info)
    # one break site, the disabled gather (dynamo counts it once in every frame that encloses it)
    assert len(explained.break_reasons) == 1, (backend, explained.break_reasons)
    assert "once per step" in explained.break_reasons[0].reason, explained.break_reasons


def _check_compile_grads(ctx, topo, backend):
    """The whole model compiled with fullgraph=True on a packed batch: gradients equal eager ones."""
    model, packed, _ = _compile_model_setup(ctx, topo, backend)
    weights = _local(_weights((2, 32, model.config.vocab_size), 4, ctx), topo)
    (model(**shard_batch(packed, topo)).logits.float() * weights).sum().backward()
    eager = _grads(model)
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=_compile_backend())
    (compiled(**shard_batch(packed, topo)).logits.float() * weights).sum().backward()
    got = _grads(model)
    assert len(got) == len(eager)
    for a, b in zip(eager, got):
        torch.testing.assert_close(b, a, **_tol(ctx, backend))


def _body_compile(ctx, cases):
    """``cases``: (backend, checks) with checks among layer, model, no-info, grads."""
    topo = ulysses_sp.init_sp(2)
    checks = {
        "layer": _check_compile_layer,
        "model": _check_compile_model,
        "no-info": _check_compile_no_info,
        "grads": _check_compile_grads,
    }
    for backend, names in cases:
        with torch.set_grad_enabled(_with_grads(backend)):
            for name in names:
                checks[name](ctx, topo, backend)


ALL_COMPILE_CHECKS = ("layer", "model", "no-info", "grads")
# on CPU dynamo tracing costs seconds per check (flex the most): each check on at least one backend
CPU_COMPILE_CASES = [
    ("sdpa", ("layer", "model", "grads")),
    ("eager", ("model", "no-info")),
    ("flex_attention", ("model",)),
]


def test_compile_masks_sp2():
    """Packed/windowed/padded batches compile per layer and as a whole with zero graph breaks in
    ulysses_sp, and compiled gradients equal eager ones (aot_eager; Inductor is covered by test_apply on GPU)."""
    cases = CPU_COMPILE_CASES
    if harness.on_gpu():
        cases = [(b, ALL_COMPILE_CHECKS) for b in ("sdpa", "eager", "flex_attention")]
    harness.run(_body_compile, 2, cases)


# --- GPU only -------------------------------------------------------------------------------------


def _need_gpu():
    if not harness.on_gpu():
        pytest.skip("GPU-only: run with ULYSSES_SP_TEST_BACKEND=nccl on a CUDA machine")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "backend,package", [("flash_attention_2", "flash_attn"), ("flash_attention_3", "flash_attn_interface")]
)
def test_flash_attention_gpu(backend, package):
    """flash-attention (varlen with cu_seqlens from the step's info): packed, windows, padding at
    sp=4 and dp2 x sp2 (sp=2 on a 2-GPU node), custom masks refused; compiled without graph breaks,
    grads equal eager."""
    _need_gpu()
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed ({backend})")
    if torch.cuda.device_count() >= 4:
        harness.run(_body_sp4_dp2xsp2, 4, [backend])
    else:
        harness.run(_body_sp2, 2, backend)
    harness.run(_body_compile, 2, [(backend, ALL_COMPILE_CHECKS)])


def _body_sdpa_routes(ctx, route):
    """sdpa on CUDA never builds a dense mask for packed/padded/windowed batches: torch varlen for
    bf16 (route "varlen"), flex for fp32 above the dense limit (route "flex", limit lowered to 0).
    Every check, compile included, then runs through that route."""
    if route == "flex":
        backends.dense.DENSE_MASK_WARN_TOKENS = 0
    topo = ulysses_sp.init_sp(2)
    _run_checks(ctx, topo, "sdpa", PACKED_ALL, WINDOWED)
    model = tiny_model("tiny-mistral", dtype=ctx.dtype, **_flex_head_dim("tiny-mistral", "sdpa")).to(ctx.device)
    ulysses_sp.apply(model, topo)
    # varlen cannot window across interior padding (that batch takes the dense/flex path): ends only
    for extra in ({"seq_lens": LENS}, {"attention_mask": _padding_mask(ctx, interior=route == "flex")}):
        local = shard_batch({"input_ids": tokens(2, 32, device=ctx.device), **extra}, topo)
        model(**local)
        keys = {key[0] for key in local[SEQ_INFO_KWARG].cache}
        assert "dense" not in keys, f"{route}: a dense mask was built ({keys})"
        assert (route == "flex") == ("flex" in keys), keys
    for check in (_check_compile_layer, _check_compile_model, _check_compile_grads):
        check(ctx, topo, "sdpa")


@pytest.mark.gpu
@pytest.mark.parametrize("route", ["varlen", "flex"])
def test_sdpa_memory_safe_routes_gpu(route, monkeypatch):
    _need_gpu()
    if route == "varlen":
        if backends.varlen.torch_varlen() is None:
            pytest.skip("this torch has no torch.nn.attention.varlen.varlen_attn with window_size/enable_gqa")
        monkeypatch.setenv("ULYSSES_SP_TEST_DTYPE", "bf16")  # the varlen kernel is half precision only
    else:
        monkeypatch.setenv("ULYSSES_SP_TEST_DTYPE", "fp32")
    harness.run(_body_sdpa_routes, 2, route)
