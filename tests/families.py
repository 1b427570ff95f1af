"""Every causal-LM family the installed transformers ships, as a tiny random model.

The family list comes from transformers itself (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``: model type ->
causal-LM class), not from a hand list, so a new transformers release brings its new families into
the sweep (tests/distributed/core/test_family_sweep.py) without an edit here. Each family's default
config is shrunk by :func:`tiny_config`: every size field it has that this module knows is set small
(2 layers, width 64, 4 query heads over 2 kv heads, vocabulary 256, tiny MLPs and experts). Where the
generic shrinker cannot know a family's constraint, ``OVERRIDES`` holds its extra keywords; families
that cannot be built from a config alone are in ``SKIPS`` with the reason.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

#: the sequence length of the sweep's batches: a multiple of 4 (sp4), longer than WINDOW
SEQ = 24
#: sliding windows and attention chunks are set shorter than SEQ, so that they change the result
WINDOW = 8

#: size fields -> tiny value; only the fields a family's config already has are set
_SIZES = {
    # depth
    "num_hidden_layers": 2,
    "n_layer": 2,
    "num_layers": 2,
    "n_layers": 2,
    "decoder_layers": 2,
    # width
    "hidden_size": 64,
    "n_embd": 64,
    "d_model": 64,
    "embed_dim": 64,
    "emb_dim": 64,
    # heads: 4 query heads over 2 kv heads of 16 dims (sp4 gives each rank one query head)
    "num_attention_heads": 4,
    "n_head": 4,
    "num_heads": 4,
    "n_heads": 4,
    "decoder_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_kv_heads": 2,
    "head_dim": 16,
    "kv_channels": 16,
    "rotary_dim": 8,
    # multi-head latent attention (DeepSeek-V2/V3 and their kin)
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    # linear attention (Kimi Delta Attention): 4 heads, so that sp4 gives each rank one
    "linear_num_heads": 4,
    "linear_head_dim": 16,
    # Mamba2 SSD mixers: 8 heads of 16 dims fill the inner width (expand 2 x width 64); the torch
    # scan of older transformers (5.17) materialises [B, chunks, chunk, chunk, heads, state]: 16 GiB
    # with Bamba's default 128 heads, state 256 and chunk 256
    "mamba_n_heads": 8,
    "mamba_num_heads": 8,
    "mamba_d_head": 16,
    "mamba_head_dim": 16,
    "mamba_d_ssm": 128,
    "mamba_d_state": 16,
    "ssm_state_size": 16,
    "state_size": 16,
    # MLPs and experts
    "intermediate_size": 64,
    "n_inner": 64,
    "ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "ffn_hidden_size": 64,
    "expert_ffn_hidden_size": 32,
    "dim_ff": 64,
    "dff": 64,
    "d_inner": 64,
    "first_dense_intermediate_size": 64,
    "moe_shared_expert_intermediate_size": 32,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_topk": 2,
    "moe_k": 2,
    "top_k": 2,
    "n_shared_experts": 1,
    "num_experts_per_token": 2,
    "n_group": 1,
    "num_expert_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "zero_expert_num": 2,  # LongCat's identity experts: routed like the others, in the router's width
    # vocabulary and positions
    "vocab_size": 256,
    "vocab_size_per_layer_input": 256,
    "unpadded_vocab_size": 256,
    "shape_vocab_size": 256,
    "pronunciation_vocab_size": 256,
    "shape_embed_dim": 16,
    "pronunciation_embed_dim": 16,
    "max_position_embeddings": 512,
    # windows and chunks shorter than the batch, so that they matter
    "sliding_window": WINDOW,
    "attention_chunk_size": WINDOW,
    "chunk_size": WINDOW,  # Mamba2's SSD chunks: the state is carried across chunks
    "mamba_chunk_size": WINDOW,
    "block_size": WINDOW,  # MiniMax's lightning-attention blocks: the decayed state is carried across blocks
}

#: config fields of training-mode randomness, set to 0
_RANDOM = re.compile(r"dropout|pdrop|jitter|drop_prob")

#: size fields whose None means "this feature is off" (no window, no low-rank query projection)
_OFF_WHEN_NONE = {"sliding_window", "attention_chunk_size", "q_lora_rank", "rotary_dim"}

#: model type -> keywords the generic shrinker cannot know (applied after it)
OVERRIDES: dict[str, dict] = {
    "bamba": dict(attn_layer_indices=[1]),  # one Mamba layer, one attention layer
    "dbrx": dict(
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(ffn_hidden_size=64, moe_num_experts=4, moe_top_k=2),
    ),
    "dory": dict(num_hidden_layers=2),
    # its sliding layers' MLA sizes come from swa_* keywords (per_layer_config), head_dim = nope + rope
    "dots3_note_text": dict(
        swa_num_attention_heads=4,
        swa_num_key_value_heads=4,
        swa_q_lora_rank=16,
        swa_kv_lora_rank=16,
        swa_head_dim=16,
        swa_qk_nope_head_dim=8,
        swa_v_head_dim=8,
    ),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], window_size=WINDOW),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),
    "mamba2": dict(num_heads=8),  # hidden_size * expand = num_heads * head_dim
    "musicgen": dict(num_codebooks=1),  # one codebook: a [B, S] batch of tokens
    "musicgen_melody": dict(num_codebooks=1),
    "recurrent_gemma": dict(block_types=["recurrent", "attention"]),
    "zaya": dict(num_experts_per_tok=1),
}

#: model type -> why the family cannot be built as a tiny model from its config alone
SKIPS: dict[str, str] = {
    "cohere_compass_text": "its rotary embedding reads RoPE parameters per layer type that the config does not build",
    "gemma3n_text": "KV-cache sharing across layers (num_kv_shared_layers) needs a layout the shrinker cannot derive",
    "dory": "its layer count is derived from other fields: a given num_hidden_layers is overwritten",
    "granitemoehybrid": "a tiny config with an attention layer among its Mamba layers needs its layer-type names",
    "kolibri1_1": "its indexer's heads are validated against a per-key-head layout the shrinker cannot derive",
    "qwen4_exp_text": "its indexed attention's budget and compression ratio have no default",
    "reformer": "LSH/local attention with axial position embeddings factored to the hidden size and sequence",
    "xlstm": "its mLSTM state shapes follow block sizes the shrinker cannot derive",
    "xmod": "a forward needs a default language set on the model (set_default_language)",
    "zamba": "its layer_types list has its own length rule (shared attention blocks)",
    "zamba2": "its layer_types list has its own length rule (shared attention blocks)",
}


def causal_lm_families() -> dict[str, str]:
    """model type -> causal-LM class name, one model type per class (several model types reuse e.g.
    LlamaForCausalLM), for every family of the installed transformers whose causal-LM class is a
    language model of its own: classes whose config is made of sub-model configs (vision, audio, text
    or patcher towers) are composite models, left out (``composite_families``)."""
    out, seen = {}, set()
    for model_type, name in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()):
        cls = getattr(transformers, name)
        if name in seen or _is_composite(cls.config_class):
            continue
        if cls.config_class is not CONFIG_MAPPING[model_type] and _owner(name) is not None:
            continue  # another model type owns this class's config (e.g. exaone -> LlamaForCausalLM)
        seen.add(name)
        out[model_type] = name
    return out


def composite_families() -> dict[str, str]:
    """model type -> class name of the causal-LM classes that are composite models (sub-model configs)."""
    families = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items())
    return {t: n for t, n in families if _is_composite(getattr(transformers, n).config_class)}


def _is_composite(config_class) -> bool:
    """A config made of another modality's or another model's configs (not e.g. DBRX's attn_config)."""
    return any(
        part in key for key in config_class.sub_configs for part in ("text", "vision", "audio", "patcher", "encoder")
    )


def property_representatives(record: dict) -> list[str]:
    """One family per combination of attention properties (GQA, MLA, sliding windows, chunks, logit
    softcapping, MoE), the first by name among those at parity at sp2 in ``record``: the families the
    sweep also runs at sp4 and dp2 x sp2 (all of them would take minutes there on CI's two cores)."""
    rows = record.get("families", {}) if record.get("transformers") == transformers.__version__ else {}
    seen, out = set(), []
    for model_type in causal_lm_families():
        if model_type in SKIPS or (rows and rows.get(model_type, {}).get("sp2") != "parity"):
            continue
        fields = tiny_config(model_type).to_dict()
        heads, kv = fields.get("num_attention_heads"), fields.get("num_key_value_heads")
        layer_types = fields.get("layer_types") or []
        signature = (
            isinstance(heads, int) and isinstance(kv, int) and kv < heads,
            bool(fields.get("kv_lora_rank")),
            bool(fields.get("sliding_window")) or "sliding_attention" in layer_types,
            bool(fields.get("attention_chunk_size")) or "chunked_attention" in layer_types,
            bool(fields.get("attn_logit_softcapping")),
            any(fields.get(k) for k in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")),
        )
        if signature not in seen:
            seen.add(signature)
            out.append(model_type)
    return out


def _owner(class_name: str) -> str | None:
    """The model type whose own config class is ``class_name``'s config class, if any."""
    config_class = getattr(transformers, class_name).config_class
    for model_type, name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        if name == class_name and CONFIG_MAPPING[model_type] is config_class:
            return model_type
    return None


def _model_class(model_type: str):
    return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])


def tiny_config(model_type: str):
    """The family's default config with every known size field shrunk (``_SIZES``), plus its overrides.

    Layer types: one layer of each kind the default config has (in the order they first appear), so
    that a hybrid or mixed-window model keeps every kind of layer."""
    config_class = _model_class(model_type).config_class
    default = config_class()
    fields = default.to_dict()
    # a None that switches a feature off stays None; other None sizes are derived ones, set them too
    kwargs = {k: v for k, v in _SIZES.items() if k in fields and (fields[k] is not None or k not in _OFF_WHEN_NONE)}
    # training-mode randomness off (dropout, router jitter): parity compares two forwards
    kwargs.update({k: 0.0 for k, v in fields.items() if isinstance(v, float) and _RANDOM.search(k)})
    if fields.get("qk_rope_head_dim"):
        # MLA: rotary runs on the rope part only; every query head has its own key/value head
        kwargs.update(head_dim=_SIZES["qk_rope_head_dim"], num_key_value_heads=_SIZES["num_attention_heads"])
    layer_types = fields.get("layer_types")
    if isinstance(layer_types, list) and layer_types:
        kinds = list(dict.fromkeys(layer_types))
        kwargs["layer_types"] = kinds * (2 if len(kinds) == 1 else 1)
        for key in ("num_hidden_layers", "num_layers", "n_layer"):
            if key in kwargs:
                kwargs[key] = len(kwargs["layer_types"])
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id"):
        value = fields.get(key)
        if isinstance(value, int) and value >= _SIZES["vocab_size"]:
            kwargs[key] = 0
    kwargs.update(OVERRIDES.get(model_type, {}))
    return config_class(**kwargs)


def tiny_model(model_type: str, seed: int = 0, dtype=torch.float32):
    """A random-init causal LM of ``model_type``, identical on every rank for the same seed."""
    torch.manual_seed(seed)
    return _model_class(model_type)._from_config(tiny_config(model_type), dtype=dtype).train()


# --- the committed record of the sweep, and the support matrix's family table generated from it ------

ROOT = Path(__file__).resolve().parent.parent
RECORD_PATH = ROOT / "tests" / "family_record.json"
DOC_PATH = ROOT / "docs" / "support-matrix.md"
LAYOUTS = ("sp2", "sp4", "dp2xsp2")
_BEGIN, _END = "<!-- family-sweep:begin (generated from tests/family_record.json) -->", "<!-- family-sweep:end -->"


def load_record() -> dict:
    return json.loads(RECORD_PATH.read_text()) if RECORD_PATH.exists() else {}


def merge_record(record: dict, found: dict, layouts) -> dict:
    """``record`` with the sweep's classifications ``found`` (model type -> layout -> status) of
    ``layouts`` written in (replacing those layouts' columns), for the installed transformers;
    families it no longer ships are dropped."""
    current = causal_lm_families()
    old = record.get("families", {}) if record.get("transformers") == transformers.__version__ else {}
    rows = {}
    for model_type, class_name in current.items():
        if model_type in SKIPS:
            continue
        kept = {k: v for k, v in old.get(model_type, {}).items() if k in LAYOUTS and k not in layouts}
        row = {"class": class_name, **kept}
        row.update(found.get(model_type, {}))
        rows[model_type] = row
    return {
        "transformers": transformers.__version__,
        "families": rows,
        "skipped": dict(sorted(SKIPS.items())),
        "composite": composite_families(),
    }


def save_record(record: dict) -> None:
    """Write the record and regenerate the doc's family table from it."""
    RECORD_PATH.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    doc = DOC_PATH.read_text()
    head, rest = doc.split(_BEGIN)
    tail = rest.split(_END)[1]
    DOC_PATH.write_text(f"{head}{_BEGIN}\n{render_table(record)}{_END}{tail}")


def doc_table() -> str:
    """The family table as docs/support-matrix.md has it now."""
    return DOC_PATH.read_text().split(_BEGIN)[1].split(_END)[0].lstrip("\n")


def render_table(record: dict) -> str:
    """Markdown: one row per family, its status at each layout ("—": not run at that layout)."""
    rows = record.get("families", {})
    lines = ["| family (model type) | causal-LM class | sp2 | sp4 | dp2×sp2 |", "| --- | --- | --- | --- | --- |"]
    for model_type, row in sorted(rows.items()):
        sp2 = row.get("sp2", "—")
        others = [row.get(k, "—") for k in LAYOUTS[1:]]
        others = ["refused, as at sp2" if s == sp2 and s != "parity" else s for s in others]
        cells = " | ".join(c.replace("|", "/") for c in (sp2, *others))
        lines.append(f"| `{model_type}` | `{row['class']}` | {cells} |")
    parity = sum(row.get("sp2") == "parity" for row in rows.values())
    lines += [
        "",
        f"transformers {record.get('transformers')}: {len(rows)} families, {parity} at parity at sp2. "
        "Not swept: composite models (their causal-LM class wraps vision/audio/patcher towers): "
        + ", ".join(f"`{t}`" for t in record.get("composite", {}))
        + ". Skipped (no tiny model from the config alone): "
        + "; ".join(f"`{t}`: {r}" for t, r in record.get("skipped", {}).items())
        + ".",
        "",
    ]
    return "\n".join(lines)
