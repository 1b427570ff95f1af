"""Named model shapes built from configs with random weights (no hub downloads).

The tiny presets cover the attention variants SP must handle: MHA, GQA with fewer kv heads than a
typical sp size, sliding windows, q/k norms, MLA with a value head dim unlike the query's,
attention sinks (GPT-OSS), and head counts no sp size divides. ``llama-8b`` is the Llama-3.1-8B
shape used by the benchmarks.
"""

from __future__ import annotations

import json
import os
import re

from ..data.text import BYTE_VOCAB_SIZE

#: org/name, as a model id on the Hugging Face hub
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

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


def model_source(name_or_path: str) -> str:
    """Where ``--model`` reads its config from, checked on the file system only (transformers is not
    imported): the preset name, or the config file (a directory's config.json, or the file given,
    whatever its name). ValueError for anything else; nothing is downloaded."""
    if name_or_path in PRESETS:
        return name_or_path
    path = os.path.join(name_or_path, "config.json") if os.path.isdir(name_or_path) else name_or_path
    if os.path.isfile(path):
        return path
    if os.path.isdir(name_or_path):
        where = f"the directory {name_or_path!r} has no config.json"
    elif _HUB_ID.match(name_or_path) and not name_or_path.endswith(".json"):
        where = (
            f"{name_or_path!r} looks like a hub model id, and ulysses_sp downloads nothing: download it first "
            f"(huggingface-cli download {name_or_path} --local-dir DIR) and pass DIR"
        )
    else:
        where = f"{name_or_path!r} is neither a preset nor a file or directory on disk"
    raise ValueError(
        f"--model: {where}. --model takes a preset ({', '.join(PRESETS)}), a model's config file (any file name) or "
        "a model directory"
    )


def build_config(name_or_path: str, **overrides):
    """The transformers config of a preset name, a model directory (its config.json) or a config file
    (that file, whatever its name), for a model AutoModelForCausalLM builds."""
    import transformers  # here, not at import: model_source and the presets table need none of it

    source = model_source(name_or_path)
    if source in PRESETS:
        cls_name, kwargs = PRESETS[source]
        return getattr(transformers, cls_name)(**{**kwargs, **overrides})
    try:
        with open(source) as f:
            model_type = json.load(f).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"--model {source}: not a JSON object of a transformers config ({e})") from None
    if model_type is None:
        raise ValueError(f"--model {source}: the file has no model_type; is it a transformers config.json?")
    config = transformers.AutoConfig.from_pretrained(source, **overrides)  # this file, not its directory's config.json
    if type(config) not in transformers.MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(
            f"--model {source}: model_type {model_type!r} ({type(config).__name__}) has no causal-LM class in "
            "transformers (AutoModelForCausalLM); launch/train.py trains causal language models"
        )
    return config
