"""Models and settings ``apply`` refuses with a ValueError, before anything is changed."""

from __future__ import annotations

import importlib
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


@pytest.mark.skipif(not hasattr(transformers, "Lfm3Config"), reason="LFM3 is in transformers >= 5.2x, not this one")
def test_a_layer_type_ulysses_sp_cannot_run_is_refused():
    lfm3 = small_model("Lfm3Config", num_hidden_layers=2, layer_types=["conv", "full_attention"], pad_token_id=0)
    with pytest.raises(
        ValueError,
        match=r"Lfm3ForCausalLM has 1 layers of type \['conv'\], of which ulysses_sp can run 0 .*"
        r"supports \['full_attention', 'sliding_attention', 'chunked_attention'\] layers and the linear-attention",
    ):
        ulysses_sp.apply(lfm3, TOPO2)
    assert not ulysses_sp.is_applied(lfm3)


def test_models_ulysses_sp_refuses():
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
    for model in (bloom, falcon, doge, uneven_kv, few_heads):
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


def test_transformers_outside_the_tested_range(monkeypatch):
    """Older than the tested range: refused; newer: a warning (docs/testing.md, setup.cfg)."""
    apply_module = importlib.import_module("ulysses_sp.core.apply")  # the module, not the function
    monkeypatch.setattr(apply_module, "transformers", SimpleNamespace(__version__="5.16.2"))
    with pytest.raises(RuntimeError, match=r"needs transformers >= 5.17, .* 'transformers>=5.17,<5.26'"):
        apply_module._check_transformers()
    monkeypatch.setattr(apply_module, "transformers", SimpleNamespace(__version__="5.26.0"))
    with pytest.warns(UserWarning, match=r"tested with transformers >= 5.17, < 5.26; found 5.26.0"):
        apply_module._check_transformers()


def test_models_whose_positions_ignore_the_global_ids_are_refused():
    """Found by the family sweep as silent mismatches: BART-style decoders number positions from the
    start of the call (their backbone takes no position_ids); RoBERTa-style embeddings derive position
    ids from the token ids, offset past padding_idx."""
    from tests import families

    bart, roberta = families.tiny_model("bart"), families.tiny_model("roberta")
    with pytest.raises(ValueError, match=r"BartForCausalLM's backbone \(BartDecoderWrapper\) takes no position_ids"):
        ulysses_sp.apply(bart, TOPO2)
    with pytest.raises(ValueError, match=r"RobertaForCausalLM derives its position ids from the token ids"):
        ulysses_sp.apply(roberta, TOPO2)
    assert not ulysses_sp.is_applied(bart) and not ulysses_sp.is_applied(roberta)


def test_a_recurrent_layer_named_only_in_layers_block_type_is_refused(monkeypatch):
    """transformers 5.17's RecurrentGemmaConfig names its layer kinds in ``layers_block_type`` only
    (["recurrent", "attention"]), no ``layer_types``: its recurrent layers are refused all the same, not
    run on the shard alone. Here the installed transformers' config is made to read as 5.17's."""
    from tests import families

    model = families.tiny_model("recurrent_gemma")
    config_class = type(model.config)
    attribute_map = {k: v for k, v in config_class.attribute_map.items() if k != "layer_types"}
    monkeypatch.setattr(config_class, "attribute_map", attribute_map)
    monkeypatch.setattr(
        config_class, "layers_block_type", property(lambda self: (self.block_types * 100)[: self.num_hidden_layers])
    )
    assert getattr(model.config, "layer_types", None) is None
    with pytest.raises(
        ValueError,
        match=r"RecurrentGemmaForCausalLM has 1 layers of type \['recurrent'\], of which ulysses_sp can run 0",
    ):
        ulysses_sp.apply(model, TOPO2)
    assert not ulysses_sp.is_applied(model)
