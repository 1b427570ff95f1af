"""Named model shapes built from configs with random weights (no hub downloads).

The tiny presets cover the attention variants SP must handle: MHA, GQA with fewer kv heads than a
typical sp size, sliding windows, q/k norms, MLA with a value head dim unlike the query's,
attention sinks (GPT-OSS), and head counts no sp size divides. ``llama-8b`` is the Llama-3.1-8B
shape used by the benchmarks.
"""

from __future__ import annotations

import json
import os

import transformers

from ..data.text import BYTE_VOCAB_SIZE

# fmt: off
# a table: one preset per line reads better than the formatter's one keyword per line
_TINY = dict(vocab_size=BYTE_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             max_position_embeddings=4096, attention_dropout=0.0, tie_word_embeddings=False)

PRESETS: dict[str, tuple[str, dict]] = {
    # name: (config class, kwargs)
    "tiny-llama": ("LlamaConfig", dict(_TINY, num_attention_heads=4, num_key_value_heads=4)),
    "tiny-llama-gqa": ("LlamaConfig", dict(_TINY, num_attention_heads=8, num_key_value_heads=2)),
    "tiny-qwen2": ("Qwen2Config", dict(_TINY, num_attention_heads=8, num_key_value_heads=2)),
    "tiny-qwen3": ("Qwen3Config", dict(_TINY, num_attention_heads=4, num_key_value_heads=1, head_dim=16)),
    "tiny-mistral": ("MistralConfig", dict(_TINY, num_attention_heads=4, num_key_value_heads=2, sliding_window=12)),
    "tiny-qwen2-mixed-window": ("Qwen2Config", dict(
        _TINY, num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=10,
        max_window_layers=1, layer_types=["full_attention", "sliding_attention"])),
    "tiny-llama-6h": ("LlamaConfig", dict(_TINY, hidden_size=48, num_attention_heads=6, num_key_value_heads=3)),
    "tiny-deepseek-v3": ("DeepseekV3Config", dict(
        _TINY, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
        n_group=1, topk_group=1, moe_intermediate_size=32, first_k_dense_replace=1, n_shared_experts=1)),
    "tiny-gpt-oss": ("GptOssConfig", dict(  # attention sinks, alternating sliding/full layers, MoE
        _TINY, intermediate_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
        num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"])),
    "llama-8b": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=1 << 20,
        rope_theta=500000.0, tie_word_embeddings=False)),
}
# fmt: on


def build_config(name_or_path: str, **overrides) -> transformers.PretrainedConfig:
    """A preset name, a directory with config.json, or a path to a config.json."""
    if name_or_path in PRESETS:
        cls_name, kwargs = PRESETS[name_or_path]
        return getattr(transformers, cls_name)(**{**kwargs, **overrides})
    path = name_or_path
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise ValueError(
            f"--model {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json / "
            "model directory on disk"
        )
    with open(path) as f:
        model_type = json.load(f).get("model_type")
    if model_type is None:
        raise ValueError(f"{path} has no model_type; is it a transformers config.json?")
    return transformers.AutoConfig.from_pretrained(os.path.dirname(os.path.abspath(path)), **overrides)
