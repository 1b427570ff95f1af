"""Models and settings ``apply`` refuses with a ValueError, before anything is changed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers

import ulysses_sp
from tests.helpers import small_model
from ulysses_sp.core.attention import UlyssesAttention
from ulysses_sp.train.presets import build_config

TOPO2 = SimpleNamespace(sp_size=2, sp_rank=0, dp_size=1, dp_rank=0)


def _model(config):
    return transformers.AutoModelForCausalLM.from_config(config)


def test_models_ulysses_sp_refuses():
    lfm3 = small_model("Lfm3Config", num_hidden_layers=2, layer_types=["conv", "full_attention"], pad_token_id=0)
    with pytest.raises(
        ValueError,
        match=r"Lfm3ForCausalLM has 1 layers of type \['conv'\], of which ulysses_sp can run 0 .*"
        r"supports \['full_attention', 'sliding_attention'\] layers and the linear-attention",
    ):
        ulysses_sp.apply(lfm3, TOPO2)
    bloom = small_model("BloomConfig", n_layer=1, n_head=4)
    with pytest.raises(
        ValueError,
        match=r"BloomForCausalLM does not route attention through transformers' "
        r"AttentionInterface",
    ):
        ulysses_sp.apply(bloom, TOPO2)
    falcon = small_model("FalconConfig", alibi=True)
    with pytest.raises(ValueError, match=r"FalconForCausalLM uses ALiBi \(config.alibi=True\).* set alibi=False"):
        ulysses_sp.apply(falcon, TOPO2)
    doge = small_model("DogeConfig")
    with pytest.raises(ValueError, match=r"DogeForCausalLM computes a dynamic attention mask from each layer's values"):
        ulysses_sp.apply(doge, TOPO2)
    uneven_kv = _model(build_config("tiny-llama", num_attention_heads=8, num_key_value_heads=3, hidden_size=64))
    with pytest.raises(ValueError, match=r"num_attention_heads=8, not a multiple of num_key_value_heads=3"):
        ulysses_sp.apply(uneven_kv, TOPO2)
    few_heads = _model(build_config("tiny-llama", num_attention_heads=2, num_key_value_heads=2, hidden_size=32))
    with pytest.raises(ValueError, match=r"sp_size=4 exceeds num_attention_heads=2: .* Use sp_size <= 2"):
        ulysses_sp.apply(few_heads, SimpleNamespace(sp_size=4, sp_rank=0))
    with pytest.raises(
        ValueError,
        match=r"attention implementation 'paged_attention' is not supported by ulysses_sp; "
        r"use one of \['sdpa'",
    ):
        UlyssesAttention(TOPO2, "paged_attention")
    for model in (lfm3, bloom, falcon, doge, uneven_kv, few_heads):
        assert not ulysses_sp.is_applied(model)


def test_a_mask_the_size_of_the_shard_is_named_as_such():
    """A [s, s] mask reaching attention was built by the model from its shard (Doge-like): the error says so."""
    with pytest.raises(
        ValueError, match=r"attention got a \[4, 4\] mask, the size of the local shard \(8 tokens over 2"
    ):
        UlyssesAttention._full_mask(torch.ones(1, 1, 4, 4, dtype=torch.bool), 8, 4, 2, slice(0, 1))


def test_a_mixer_module_shaped_otherwise_is_refused():
    """A transformers whose mixer lacks what our forward reads (here: A_log removed) is refused by name,
    before anything is changed."""
    model = small_model(
        "Qwen3_5TextConfig",
        num_hidden_layers=2,
        head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        layer_types=["linear_attention", "full_attention"],
    )
    mixer = model.model.layers[0].linear_attn
    del mixer.A_log
    with pytest.raises(ValueError, match=r"Qwen3_5GatedDeltaNet of this transformers \(.*\) has no \['A_log'\]"):
        ulysses_sp.apply(model, TOPO2)
    assert not ulysses_sp.is_applied(model) and "forward" not in vars(mixer)
