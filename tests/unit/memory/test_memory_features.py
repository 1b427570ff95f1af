"""Checkpointing policies and the tiled MLP without a process group: which ops the selective policy
saves, the trainer's flags, and that both features are scoped to one model and undone cleanly.
(Numerics and all-to-all counts under SP, ZeRO-3: tests/distributed/memory/test_memory_features.py.)"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy

from tests.helpers import clone, linear_calls, small_model, tiny_model, tokens
from ulysses_sp.memory import activation_checkpointing as ckpt
from ulysses_sp.memory import offload
from ulysses_sp.memory.tiled_mlp import is_mlp_tiled, tile_mlp, untile_mlp


def test_selective_policy_saves_attention_and_a2a_only():
    save, recompute = CheckpointPolicy.MUST_SAVE, CheckpointPolicy.PREFER_RECOMPUTE
    ops = torch.ops
    for op in (
        ops.aten._scaled_dot_product_flash_attention.default,
        ops.aten._scaled_dot_product_cudnn_attention.default,
        ops.aten._scaled_dot_product_efficient_attention.default,
        ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
        ops._c10d_functional.all_to_all_single.default,
    ):
        assert ckpt.selective_policy(None, op) is save, op
    for op in (
        ops.aten.mm.default,
        ops.aten._scaled_dot_product_flash_attention_backward.default,
        ops._c10d_functional.wait_tensor.default,
        ops._c10d_functional.all_reduce.default,
    ):
        assert ckpt.selective_policy(None, op) is recompute, op
    from torch._higher_order_ops.flex_attention import flex_attention

    assert ckpt.op_name(flex_attention) in ckpt.SAVED_OPS


def test_policy_names_and_kwargs():
    assert [ckpt.resolve_policy(v) for v in (None, False, True, "none", "full", "selective")] == [
        "none",
        "none",
        "full",
        "none",
        "full",
        "selective",
    ]
    with pytest.raises(ValueError, match="unknown checkpointing policy"):
        ckpt.resolve_policy("some")
    assert ckpt.gradient_checkpointing_kwargs("full") == {"use_reentrant": False}
    assert set(ckpt.gradient_checkpointing_kwargs("selective")) == {"use_reentrant", "context_fn"}
    with pytest.raises(ValueError, match="checkpoints nothing"):
        ckpt.gradient_checkpointing_kwargs("none")


def test_enable_disable_checkpointing_is_scoped_and_undone():
    model, other = tiny_model("tiny-llama"), tiny_model("tiny-llama")
    ckpt.enable_checkpointing(model, "selective", offload=True)
    layers = model.model.layers
    assert ckpt.checkpointed_layers(model) and not ckpt.checkpointed_layers(other)
    assert all(isinstance(layer._gradient_checkpointing_func, offload.OffloadLayerInput) for layer in layers)
    ckpt.enable_checkpointing(model, "full")  # enabling again replaces the offload wrappers
    assert not any(isinstance(layer._gradient_checkpointing_func, offload.OffloadLayerInput) for layer in layers)
    ckpt.enable_checkpointing(model, "full", offload=True)
    ckpt.disable_checkpointing(model)
    assert not ckpt.checkpointed_layers(model)
    assert not any(
        isinstance(getattr(layer, "_gradient_checkpointing_func", None), offload.OffloadLayerInput) for layer in layers
    )
    with pytest.raises(ValueError, match="needs policy 'full' or 'selective'"):
        ckpt.enable_checkpointing(model, "none", offload=True)


@pytest.mark.parametrize("offload", [False, True])
def test_offload_frees_each_layer_input_on_the_device_until_its_backward(offload):
    """With offload the checkpoints' inputs (the embedding's and each decoder layer's output but the
    last, which the final norm keeps) are freed after the forward: only their host copies remain
    (on CPU a real copy too). Found on an H100: the saved-tensor hook's closure held every layer
    input on the device until its layer's backward, so the offload freed nothing. Without offload
    the checkpoints keep them. Gradients equal in both cases."""
    import weakref

    ref = tiny_model("tiny-llama", num_hidden_layers=3)
    model = clone(ref)
    ckpt.enable_checkpointing(ref, "full")
    ckpt.enable_checkpointing(model, "full", offload=offload)
    outputs = {}

    def keep(name):
        def hook(module, args, out):
            outputs[name] = weakref.ref(out[0] if isinstance(out, tuple) else out)

        return hook

    model.model.embed_tokens.register_forward_hook(keep("embed"))
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(keep(f"layer {i}"))
    ids = tokens(2, 23)
    loss = model(input_ids=ids, labels=ids).loss
    alive = sorted(name for name, r in outputs.items() if r() is not None)
    assert alive == (["layer 2"] if offload else ["embed", "layer 0", "layer 1", "layer 2"]), alive
    loss.backward()
    ref(input_ids=ids, labels=ids).loss.backward()
    for (name, p), r in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=0, atol=0, msg=name)


def test_tile_mlp_is_scoped_and_undone():
    model = tiny_model("tiny-llama")
    other = type(model)(model.config)  # built from the same config object
    tile_mlp(model, 4)
    assert is_mlp_tiled(model) and not is_mlp_tiled(other)
    assert all("forward" in layer.mlp.__dict__ for layer in model.model.layers)
    assert not any("forward" in layer.mlp.__dict__ for layer in other.model.layers)
    with pytest.raises(ValueError, match="already tiled"):
        tile_mlp(model)
    untile_mlp(model)
    assert not is_mlp_tiled(model) and not any("forward" in layer.mlp.__dict__ for layer in model.model.layers)
    assert not model.model._forward_pre_hooks
    with pytest.raises(ValueError, match="not tiled"):
        untile_mlp(model)
    moe = tiny_model("tiny-deepseek-v3")  # layer 0 dense, layer 1 MoE: only the dense MLP is tiled
    tile_mlp(moe)
    assert ["forward" in layer.mlp.__dict__ for layer in moe.model.layers] == [True, False]


def _down_projections(model):
    """:func:`linear_calls` of the down projections of ``model``'s decoder layers."""
    weights = {id(layer.mlp.down_proj.weight) for layer in model.model.layers}
    return linear_calls(lambda weight: id(weight) in weights)


def test_tiled_mlp_under_autocast_and_checkpointing():
    """The backward reruns the tiles in the forward's autocast state: bf16 like the untiled MLP; the
    layer's recomputation under checkpointing runs none, and the tiles' rerun stops before the down
    projection, whose gradients the backward computes itself."""
    ref = tiny_model("tiny-llama")
    ckpt.enable_checkpointing(ref, "full")
    model = tile_mlp(clone(ref), 5)
    ids = tokens(2, 23)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref(input_ids=ids, labels=ids).loss.backward()
        with _down_projections(model) as calls:
            model(input_ids=ids, labels=ids).loss.backward()
    # 10 tiles in each layer's forward (2 layers); the checkpoint's recomputation stops before the
    # tiled forward (the tiles' source is the layer's last saved tensor) and the backward's tiles
    # before their down projection: no call in the backward
    assert calls == [torch.bfloat16] * 20, calls
    for (name, p), r in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=2e-2, atol=2e-2 * r.grad.abs().max().item(), msg=name)


class _ScaledOutput(torch.nn.Module):
    """An MLP whose output is its down projection's, changed in place: the tiles cannot skip it."""

    def __init__(self, mlp):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x)).mul_(0.5)


@pytest.mark.parametrize("case", ["bias", "frozen down", "hooked down", "output changed"])
def test_tiled_mlp_down_projection_skip_is_exact_or_off(case):
    """The tiles' backward computes the down projection's gradients itself only where the MLP
    returns that projection's output as it is and nothing hooks it; fp32 gradients equal the
    untiled model's in every case, with or without the skip."""
    ref = tiny_model("tiny-llama", mlp_bias=case == "bias")
    if case == "output changed":
        for layer in ref.model.layers:
            layer.mlp = _ScaledOutput(layer.mlp)
    if case == "frozen down":
        for layer in ref.model.layers:
            layer.mlp.down_proj.requires_grad_(False)
    model = tile_mlp(clone(ref), 5)
    if case == "hooked down":
        for layer in model.model.layers:
            layer.mlp.down_proj.register_forward_hook(lambda m, i, out: None)
    ids = tokens(2, 23)
    ref(input_ids=ids, labels=ids).loss.backward()
    with _down_projections(model) as calls:
        model(input_ids=ids, labels=ids).loss.backward()
    skipped = case in ("bias", "frozen down")
    assert len(calls) == (20 if skipped else 40), (case, len(calls))
    for (name, p), r in zip(model.named_parameters(), ref.parameters()):
        assert (p.grad is None) == (r.grad is None), name
        if r.grad is not None:
            torch.testing.assert_close(p.grad, r.grad, rtol=1e-5, atol=1e-6 * r.grad.abs().max().item(), msg=name)


def test_tiled_mlp_recomputes_its_input_from_an_rms_norm_recompute():
    """Fed by an RMSNorm recompute's output, the tiled MLP saves the norm's input (kept by the norm
    anyway) instead of its own input and recomputes each tile of it: no [T, d] tensor of its own is
    saved. Gradients equal the untiled model's under every checkpointing policy; an input changed in
    place since the norm (or another producer) is saved as before."""
    from ulysses_sp.memory.rms_norm import RMSNormFunction, enable_rms_norm_recompute, norm_source
    from ulysses_sp.memory.tiled_mlp import MLPCall, TiledMLP

    ref = tiny_model("tiny-llama-gqa")
    ids = tokens(2, 23)
    ref(input_ids=ids, labels=ids).loss.backward()
    for policy in ("none", "full", "selective"):
        model = clone(ref)
        model.zero_grad()
        tile_mlp(model, 5)
        enable_rms_norm_recompute(model)
        ckpt.enable_checkpointing(model, policy)
        model(input_ids=ids, labels=ids).loss.backward()
        for (name, p), r in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(
                p.grad, r.grad, rtol=1e-5, atol=1e-6 * r.grad.abs().max().item(), msg=lambda m: f"{policy} {name}: {m}"
            )

    mlp = ref.model.layers[0].mlp
    weight = torch.ones(ref.config.hidden_size)
    h = torch.randn(2, 7, ref.config.hidden_size, requires_grad=True)
    x = RMSNormFunction.apply(h, weight, 1e-6, 4, True)
    assert norm_source(x) is not None
    saved = _saved_bytes(lambda t: TiledMLP.apply(t, None, MLPCall(mlp), 3, list(mlp.parameters())), x)
    assert saved == h.nbytes + weight.nbytes, saved  # h (the norm's input) and the weight's copy, not x
    x_changed = RMSNormFunction.apply(h, weight, 1e-6, 4, True).mul_(1)  # allowed, as on transformers' norm
    assert norm_source(x_changed) is None
    tiled = lambda t: TiledMLP.apply(t, None, MLPCall(mlp), 3, list(mlp.parameters()))  # noqa: E731
    assert _saved_bytes(tiled, x_changed) == x_changed.nbytes
    model = clone(ref)
    enable_rms_norm_recompute(model)
    sources = []
    for module in model.modules():
        if "RMSNorm" in type(module).__name__:
            module.register_forward_hook(lambda m, i, out: sources.append(norm_source(out) is not None))
    model(input_ids=ids)
    layers = ref.config.num_hidden_layers
    assert sources == [True, True] * layers + [False], sources  # the final norm's output is returned: none


def test_residual_gradient_accumulates_in_place_through_norm_and_tiled_mlp():
    """The tiled RMSNorm recompute and the tiled MLP return their input gradient whole, not as a view
    of a flat buffer: where it reaches a tensor's gradient first (the final norm's, for the last
    decoder layer), autograd adds the later gradient (the residual stream's) into it in place
    (``add_``), not into a third [T, d] tensor. Counted by the profiler: under a dispatch mode autograd
    adds out of place whatever the tensors."""
    from torch.profiler import ProfilerActivity, profile

    from ulysses_sp.memory.rms_norm import RMSNormFunction
    from ulysses_sp.memory.tiled_mlp import MLPCall, TiledMLP

    mlp = tiny_model("tiny-llama").model.layers[0].mlp
    d = mlp.gate_proj.in_features
    weight = torch.randn(d, requires_grad=True)
    branches = {
        "norm": lambda h: RMSNormFunction.apply(h, weight, 1e-6, 4),  # 4 rows per tile
        "tiled mlp": lambda h: TiledMLP.apply(h, None, MLPCall(mlp), 3, list(mlp.parameters())),
    }
    for name, branch in branches.items():
        h = torch.randn(2, 7, d, requires_grad=True) * 1  # a non-leaf: its gradient is accumulated
        later = h.exp() * 2  # built first, so its backward runs after the branch's
        loss = (branch(h) + later).pow(2).sum()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            loss.backward()
        adds = [e.name for e in prof.events() if e.name in ("aten::add", "aten::add_") and [2, 7, d] in e.input_shapes]
        assert adds == ["aten::add_"], (name, adds)


def _saved_bytes(fn, x) -> int:
    """Bytes of the distinct tensors autograd saves for the backward of ``fn(x)`` (parameters excluded)."""
    saved = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(saved.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_function_matches_llama_norm(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from ulysses_sp.memory.rms_norm import RMSNormFunction

    torch.manual_seed(0)
    norm = LlamaRMSNorm(64, eps=1e-5).to(dtype)
    norm.weight.data.normal_(1.0, 0.3)
    x = (3 * torch.randn(2, 9, 64)).to(dtype).requires_grad_()
    grad = torch.randn(2, 9, 64).to(dtype)
    want = norm(x)
    want_x, want_w = torch.autograd.grad(want, (x, norm.weight), grad)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    results = {}
    for rows in (18, 4):  # one tile; tiles of 4 of the 18 rows (the last one short)
        got = RMSNormFunction.apply(x, norm.weight, norm.variance_epsilon, rows)
        results[rows] = got_x, got_w = torch.autograd.grad(got, (x, norm.weight), grad)
        assert torch.equal(got, want)  # the same ops in the same order, row by row
        torch.testing.assert_close(got_x, want_x, **tol)
        torch.testing.assert_close(got_w, want_w, **tol)
    assert torch.equal(results[18][0], results[4][0])  # rows are independent: tiling changes no bit of grad_x
    torch.testing.assert_close(results[18][1], results[4][1], rtol=1e-5, atol=1e-6)  # summed in another order
    # what the backward keeps: the input and rstd, not an fp32 copy and the normalised tensor
    x = x.detach().to(torch.bfloat16).requires_grad_()
    norm = norm.to(torch.bfloat16)
    for rows in (18, 4):
        ours = _saved_bytes(lambda t: RMSNormFunction.apply(t, norm.weight, norm.variance_epsilon, rows), x)
        assert ours == x.nbytes + 2 * 9 * 4, ours  # x, rstd [18, 1] fp32
    assert _saved_bytes(norm, x) >= x.nbytes * 3  # fp32 copy (2x) + normalised bf16 (1x)


class _HeapPeak(TorchDispatchMode):
    """Peak C-heap bytes in use (benchmarks/cpu_memory.py's glibc reading) above the level at entry,
    sampled after every dispatched op."""

    def __enter__(self):
        try:
            from benchmarks.cpu_memory import heap_bytes
        except (OSError, AttributeError):  # no libc.so.6, or a glibc before 2.33 (no mallinfo2)
            pytest.skip("needs glibc >= 2.33 (mallinfo2) to read the heap")
        self._used = heap_bytes
        self.start = self.peak = heap_bytes()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self._used())
        return out


def test_rms_norm_tiles_bound_the_backward_temporaries():
    """The eager backward's fp32 temporaries are per tile: the peak heap above the level before the
    backward shrinks with the tile."""
    from ulysses_sp.memory.rms_norm import RMSNormFunction

    torch.manual_seed(0)
    weight = torch.randn(256, dtype=torch.bfloat16, requires_grad=True)
    x = torch.randn(4096, 256, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(4096, 256, dtype=torch.bfloat16)
    peaks = {}
    for rows in (4096, 256):
        out = RMSNormFunction.apply(x, weight, 1e-6, rows)
        with _HeapPeak() as heap:
            torch.autograd.grad(out, (x, weight), grad)
        peaks[rows] = heap.peak - heap.start
    # one tile: several [4096, 256] fp32 temporaries (4 MiB each); tiles of 256 rows: the same count
    # of 256 KiB ones, on top of grad_x itself (2 MiB bf16)
    assert peaks[4096] >= 2 * 2**20 + 3 * 4 * 2**20, peaks
    assert peaks[256] <= 2 * 2**20 + 8 * 2**18, peaks


def test_rms_norm_function_compiles_in_one_graph():
    """torch.compile traces the norm in one graph (no break), and the result and both gradients
    match eager's tiled run."""
    from ulysses_sp.memory.rms_norm import RMSNormFunction

    torch.manual_seed(0)
    w = torch.randn(64, requires_grad=True)
    x = torch.randn(2, 50, 64, requires_grad=True)
    grad = torch.randn(2, 50, 64)
    compiled = torch.compile(lambda x, w: RMSNormFunction.apply(x, w, 1e-6, 8), fullgraph=True, backend="aot_eager")
    got = compiled(x, w)
    got_x, got_w = torch.autograd.grad(got, (x, w), grad)
    want = RMSNormFunction.apply(x, w, 1e-6, 8)
    want_x, want_w = torch.autograd.grad(want, (x, w), grad)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_x, want_x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-5)


def test_rms_norm_recompute_is_scoped_undone_and_exact_in_a_model():
    from ulysses_sp.memory.rms_norm import disable_rms_norm_recompute, enable_rms_norm_recompute

    ref = tiny_model("tiny-qwen3")  # decoder norms and per-head q/k norms
    ckpt.enable_checkpointing(ref, "full")
    model, other = clone(ref), clone(ref)
    names = enable_rms_norm_recompute(model)
    layers = ref.config.num_hidden_layers
    assert len(names) == 4 * layers + 1 and "model.layers.0.self_attn.q_norm" in names, names
    assert all("forward" not in m.__dict__ for m in other.modules())
    with pytest.raises(ValueError, match="already enabled"):
        enable_rms_norm_recompute(model)
    ids = tokens(2, 23)
    losses = []
    for m in (ref, model):
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        losses.append(out.loss.detach())
    assert torch.equal(*losses)
    for (name, p), r in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-5, atol=1e-6 * r.grad.abs().max().item(), msg=name)
    disable_rms_norm_recompute(model)
    assert all("forward" not in m.__dict__ for m in model.modules())
    with pytest.raises(ValueError, match="not enabled"):
        disable_rms_norm_recompute(model)


def test_rms_norm_recompute_leaves_other_norms_alone():
    from ulysses_sp.memory.rms_norm import enable_rms_norm_recompute

    gemma = small_model("GemmaConfig", num_attention_heads=2, num_key_value_heads=1, head_dim=16)  # norm: 1 + weight
    with pytest.raises(ValueError, match=r"no Llama-style RMSNorm .*GemmaRMSNorm"):
        enable_rms_norm_recompute(gemma)


def test_compile_layers_keeps_hooks_outside_and_is_undone():
    """compile_layers on checkpointed layers (with and without offload): each layer's forward runs the
    compiled checkpoint and its checkpoint function only calls through, so module hooks (FSDP2's among
    them) run eagerly before the compiled region, once per call, also where transformers (5.17)
    checkpoints the module call; in eval the forward is the plain one; uncompile_layers restores
    every layer's own forward and checkpoint function."""
    from ulysses_sp.memory.compile import CheckpointedForward, compile_layers, uncompile_layers

    for offload_inputs in (False, True):
        model = tiny_model("tiny-llama")
        ckpt.enable_checkpointing(model, "full", offload=offload_inputs)
        layers = list(model.model.layers)
        before = [layer._gradient_checkpointing_func for layer in layers]
        compile_layers(model, backend="eager")
        calls = []
        layers[0].register_forward_pre_hook(lambda m, args: calls.append(torch.is_grad_enabled()))
        for layer in layers:
            assert isinstance(layer.__dict__["forward"], CheckpointedForward)
        ids = tokens(1, 9)
        model(input_ids=ids, labels=ids).loss.backward()  # the recomputation reruns no hook
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
        assert calls == [True, False], calls
        uncompile_layers(model)
        for layer, fn in zip(layers, before):
            assert "forward" not in layer.__dict__ and layer._gradient_checkpointing_func is fn
