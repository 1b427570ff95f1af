"""``fuse_elementwise`` without a process group, on kernels that count their calls (the torch ops on
CPU, where liger's triton kernels cannot run; liger's numerics: tests/distributed/memory/test_fused_ops.py):
only the instances of one model change and ``unfuse_elementwise`` restores their forwards, the family
check picks the modules that compute what liger computes, each op keeps the torch path where the
kernel would compute something else, the order with the other memory features, and the refusal when
liger-kernel cannot be imported."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from transformers.models.llama import modeling_llama

import ulysses_sp
from tests.helpers import CountingKernels, clone, small_model, tiny_model, tokens
from ulysses_sp.memory.fused_ops import fuse_elementwise, is_fused, unfuse_elementwise


def _patched(model) -> list[str]:
    return [name for name, m in model.named_modules() if "forward" in m.__dict__]


def _loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fused_model_only_and_undone_exactly():
    model = tiny_model("tiny-qwen3")
    other, ref = tiny_model("tiny-qwen3"), clone(model)
    rope_before = modeling_llama.apply_rotary_pos_emb
    counting = CountingKernels()
    fused = fuse_elementwise(model, counting.kernels)
    layers = model.config.num_hidden_layers
    # per layer: 2 decoder norms + q/k norms, the MLP, the attention's RoPE; and the final norm
    assert len(fused) == 4 * layers + 1 + 2 * layers
    assert set(fused) == set(_patched(model)) and is_fused(model)
    assert not _patched(other) and not is_fused(other)
    ids = tokens(2, 12, seed=3)
    loss, grads = _loss_and_grads(model, ids)
    assert counting.calls == {"rms_norm": 4 * layers + 1, "silu_mul": layers, "rope": layers}
    _loss_and_grads(other, ids)
    assert counting.calls["rope"] == layers, "a second model of the family ran the fused RoPE"
    want_loss, want = _loss_and_grads(ref, ids)
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)  # the same torch math, through our plumbing
    for name, g in want.items():
        torch.testing.assert_close(grads[name], g, rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="already fused"):
        fuse_elementwise(model, counting.kernels)
    twin = copy.deepcopy(model)  # its forwards run its own modules (nothing closes over the original's)
    assert all(m.forward.__self__ is m for name, m in twin.named_modules() if name in fused)
    unfuse_elementwise(twin)
    unfuse_elementwise(model)
    assert not _patched(model) and not is_fused(model)
    assert modeling_llama.apply_rotary_pos_emb is rope_before
    assert all(not k.startswith("_ulysses_sp") for m in model.modules() for k in m.__dict__)
    with pytest.raises(ValueError, match="not fused"):
        unfuse_elementwise(model)


@pytest.mark.parametrize(
    "config_class, overrides, want",
    [
        ("LlamaConfig", {}, {"LlamaRMSNorm", "LlamaMLP", "LlamaAttention"}),
        ("Qwen3Config", {"head_dim": 8}, {"Qwen3RMSNorm", "Qwen3MLP", "Qwen3Attention"}),
        ("MistralConfig", {}, {"MistralRMSNorm", "MistralMLP", "MistralAttention"}),
        # Gemma: (1 + weight) norms, a GELU MLP; its RoPE is Llama's
        ("GemmaConfig", {"head_dim": 8}, {"GemmaAttention"}),
        # Llama with a GELU MLP: norms and RoPE only
        ("LlamaConfig", {"hidden_act": "gelu"}, {"LlamaRMSNorm", "LlamaAttention"}),
        # Phi-3: partial rotary (other RoPE code), a fused gate_up projection; Llama's norm
        ("Phi3Config", {"partial_rotary_factor": 0.5, "pad_token_id": 0}, {"Phi3RMSNorm"}),
        # OLMo-2: the cast before the scale (other norm code), RoPE in fp32 (other code); Llama's MLP
        ("Olmo2Config", {}, {"Olmo2MLP"}),
    ],
    ids=["llama", "qwen3", "mistral", "gemma", "llama-gelu", "phi3-partial", "olmo2"],
)
def test_family_check(config_class, overrides, want):
    model = small_model(config_class, **overrides)
    counting = CountingKernels()
    fuse_elementwise(model, counting.kernels)
    assert {type(m).__name__ for m in model.modules() if "forward" in m.__dict__} == want
    unfuse_elementwise(model)


def test_nothing_to_fuse_refused():
    model = small_model("GPT2Config")  # LayerNorm, a GELU MLP, learned positions
    with pytest.raises(ValueError, match="no Llama-style RMSNorm, SiLU-gated MLP or rotary embedding to fuse"):
        fuse_elementwise(model, CountingKernels().kernels)
    assert not is_fused(model) and not _patched(model)


def test_torch_path_where_the_kernels_would_differ():
    """Another device than the kernels', mixed dtypes: the module's own ops, the kernels not called."""
    model = tiny_model("tiny-llama")
    ref, ids = clone(model), tokens(1, 8)
    elsewhere = CountingKernels(device_type="cuda")  # the model is on CPU
    fuse_elementwise(model, elsewhere.kernels)
    torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=0)
    assert elsewhere.calls == {"rms_norm": 0, "silu_mul": 0, "rope": 0}
    unfuse_elementwise(model)
    counting = CountingKernels()
    fuse_elementwise(model, counting.kernels)
    norm = model.model.norm  # fp32 weight, bf16 input: transformers returns fp32, the kernel x's dtype
    x = torch.randn(2, 3, model.config.hidden_size).bfloat16()
    assert norm(x).dtype == type(norm).forward(norm, x).dtype == torch.float32
    h = torch.randn(1, 4, model.config.hidden_size)  # fp32 q, k with bf16 cos, sin: transformers promotes
    cos, sin = (t.bfloat16() for t in model.model.rotary_emb(h, position_ids=torch.arange(4)[None]))
    got = model.model.layers[0].self_attn(h, (cos, sin), None)[0]
    torch.testing.assert_close(got, ref.model.layers[0].self_attn(h, (cos, sin), None)[0], rtol=0, atol=0)
    assert counting.calls == {"rms_norm": 0, "silu_mul": 0, "rope": 0}


def test_order_with_tiled_mlp_and_norm_recompute():
    model = tiny_model("tiny-llama-gqa")
    ref, ids = clone(model), tokens(2, 12, seed=5)
    ulysses_sp.tile_mlp(model, 5)
    with pytest.raises(ValueError, match="tile_mlp already wrap this model's forwards; call fuse_elementwise before"):
        fuse_elementwise(model, CountingKernels().kernels)
    ulysses_sp.untile_mlp(model)
    counting = CountingKernels()
    fuse_elementwise(model, counting.kernels)
    fused_forwards = {name: m.__dict__["forward"] for name, m in model.named_modules() if "forward" in m.__dict__}
    ulysses_sp.tile_mlp(model, 5)
    ulysses_sp.enable_rms_norm_recompute(model)
    with pytest.raises(ValueError, match="tile_mlp, enable_rms_norm_recompute already wrap .* undo them first"):
        unfuse_elementwise(model)
    loss, grads = _loss_and_grads(model, ids)
    layers = model.config.num_hidden_layers
    # the tiled MLP runs the fused one per tile (24 tokens: 5 tiles, forward and recomputation) and
    # recomputes its input tiles from the post-attention norm's input with the norm kernel; the
    # recomputed norms run the norm kernel
    assert counting.calls == {"rms_norm": 2 * layers + 1 + 5 * layers, "silu_mul": 10 * layers, "rope": layers}
    want_loss, want = _loss_and_grads(ref, ids)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
    for name, g in want.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6 * g.abs().max().item(), msg=name)
    ulysses_sp.disable_rms_norm_recompute(model)
    ulysses_sp.untile_mlp(model)
    assert {name: m.__dict__["forward"] for name, m in model.named_modules() if "forward" in m.__dict__} == (
        fused_forwards
    )
    unfuse_elementwise(model)
    assert not _patched(model)


def test_liger_missing_refused(monkeypatch):
    for name in ("liger_kernel.ops.rms_norm", "liger_kernel.ops.rope", "liger_kernel.ops.swiglu"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails, as without liger-kernel or triton
    model = tiny_model("tiny-llama")
    with pytest.raises(ValueError, match=r"need liger-kernel with triton .* pip install 'ulysses_sp\[liger\]'"):
        fuse_elementwise(model)
    assert not _patched(model) and not is_fused(model)


def test_lora_adapters_run_inside_the_fused_modules():
    """A PEFT model is fused inside; the projections stay module calls, so the adapters' gradients
    equal the unfused PEFT model's."""
    peft = pytest.importorskip("peft")
    LoraConfig, get_peft_model = peft.LoraConfig, peft.get_peft_model

    targets = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(
        tiny_model("tiny-llama-gqa"), LoraConfig(r=4, target_modules=targets, init_lora_weights=False)
    )
    ref, ids = clone(model), tokens(2, 10, seed=9)
    counting = CountingKernels()
    fuse_elementwise(model, counting.kernels)
    assert is_fused(model) and is_fused(model.base_model.model)
    loss, grads = _loss_and_grads(model, ids)
    assert min(counting.calls.values()) > 0
    want_loss, want = _loss_and_grads(ref, ids)
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)
    lora = [name for name in want if "lora_" in name]
    assert lora and all(torch.equal(grads[name], want[name]) for name in lora)
    unfuse_elementwise(model)
