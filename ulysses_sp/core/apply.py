"""Apply / remove Ulysses SP on one transformers model, and nothing else in the process.

How it is scoped: transformers picks the attention function by the *name* in
``config._attn_implementation``. ``apply`` gives the model private copies of its configs (two models
built from one config object would otherwise switch together), registers a name unique to this
model whose function is this model's :class:`UlyssesAttention`, and sets that name on the copies.
A name transformers has no mask builder for makes it skip mask construction (nothing S x S, nothing
sized for the shard); the masks are ours, built from the step's SequenceInfo. ``remove`` puts the
original configs back and unregisters the name; a model freed without ``remove`` unregisters it too.

A forward pre-hook on the model's backbone completes each call with what the shard alone does not
carry (model_inputs.py); in a vision-language model, on its language model, it shards the full
sequence the model built from the whole sample (vlm.py). A second one on the model itself keeps the
position ids and SequenceInfo of the call for heads that do not pass them on to their backbone
(Mamba's): without them the backbone would see one plain sequence and a recurrent layer would run
across packed documents. In a vision-language model the second one sits on its inner model and gives
packed documents their own mRoPE positions (vlm.py).

A PEFT model (``peft.get_peft_model``) is seen through: SP goes on the transformers model inside it,
which also holds this module's state, so the wrapper and the inner model answer alike (wrappers.py).
"""

from __future__ import annotations

import copy
import inspect
import itertools
import warnings
import weakref
from dataclasses import dataclass, field

import torch
import transformers
from packaging.version import Version

from . import mixers, vlm
from .attention import UlyssesAttention
from .backends.flash import check_installed
from .checks import check_int
from .heads import plan_heads, smallest_ring
from .layout import ring_size_of
from .model_inputs import complete_kwargs
from .ring import RING_BACKENDS
from .sequence_info import SEQ_INFO_KWARG
from .topology import SPTopology, ulysses_of
from .wrappers import check_adapters, unwrap

#: the transformers releases tested (docs/testing.md): the CPU suite on the newest, 5.25, the GPU runs on
#: 5.17; setup.cfg pins the same range. A newer release may route a family's attention differently (5.25
#: moved Falcon onto AttentionInterface), so it gets a warning until the suite has run on it.
MIN_TRANSFORMERS = Version("5.17")
UNTESTED_TRANSFORMERS = Version("5.26")
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
#: layer types that do not mix the sequence (Nemotron-H's feed-forward-only layers)
TOKENWISE_LAYER_TYPES = ("mlp", "moe")
_names = itertools.count()


@dataclass
class _State:
    topology: SPTopology
    attention: UlyssesAttention
    config_refs: list  # (module, original config object) for every module whose config we swapped
    hook: torch.utils.hooks.RemovableHandle
    outer_hook: torch.utils.hooks.RemovableHandle | None
    forward_params: tuple[str, ...]
    unregister: weakref.finalize  # drops the name from transformers' registry: on remove, or with the model
    mixers: mixers.Patched  # the model's linear-attention / SSM / conv mixers under SP
    call: dict = field(default_factory=dict)  # position ids / SequenceInfo of the model call, for the backbone


def _check_transformers() -> None:
    version = Version(transformers.__version__)
    if version < MIN_TRANSFORMERS:
        raise RuntimeError(
            f"ulysses_sp needs transformers >= {MIN_TRANSFORMERS}, the oldest release it is tested with; found "
            f"{transformers.__version__}. Upgrade with: "
            f"pip install -U 'transformers>={MIN_TRANSFORMERS},<{UNTESTED_TRANSFORMERS}'"
        )
    if version.release[:2] >= UNTESTED_TRANSFORMERS.release[:2]:
        warnings.warn(
            f"ulysses_sp is tested with transformers >= {MIN_TRANSFORMERS}, < {UNTESTED_TRANSFORMERS}; found "
            f"{transformers.__version__}: a newer release may route a model's attention differently. Run the "
            "family sweep (tests/distributed/core/test_family_sweep.py) on it, or install "
            f"'transformers<{UNTESTED_TRANSFORMERS}'",
            stacklevel=3,
        )


def _attention_interface():
    from transformers import AttentionInterface

    return AttentionInterface


def is_applied(model: torch.nn.Module) -> bool:
    return getattr(unwrap(model), "_ulysses_sp", None) is not None


def applied_topology(model: torch.nn.Module) -> SPTopology | None:
    """The topology ``model`` was applied with, or None when SP is not applied to it."""
    state: _State | None = getattr(unwrap(model), "_ulysses_sp", None)
    return None if state is None else state.topology


def applied_head_chunks(model: torch.nn.Module) -> int:
    """The ``head_chunks`` ``model`` was applied with (1 when SP is not applied)."""
    state: _State | None = getattr(unwrap(model), "_ulysses_sp", None)
    return 1 if state is None else state.attention.head_chunks


SELECTIVE_WITH_CHUNKS = (
    "head_chunks > 1 with selective checkpointing: the selective policy saves the all-to-all and kernel "
    "outputs of every head chunk until the backward, the full-sequence tensors head chunks exist to avoid; "
    "use full checkpointing (or none) with head chunks, or head_chunks=1 with selective"
)


def _has_selective_checkpointing(model: torch.nn.Module) -> bool:
    """Whether a checkpointed layer of ``model`` runs its checkpoint with a ``context_fn`` (the
    selective policy), also inside an offload wrapper."""
    for m in model.modules():
        fn = getattr(m, "_gradient_checkpointing_func", None)
        fn = getattr(fn, "checkpoint_fn", fn)
        if getattr(m, "gradient_checkpointing", False) and getattr(fn, "keywords", {}).get("context_fn"):
            return True
    return False


def _validate(model, config, topology: SPTopology, impl: str, head_chunks: int = 1) -> None:
    if getattr(config, "alibi", False):
        raise ValueError(
            f"{type(model).__name__} uses ALiBi (config.alibi=True): transformers adds the ALiBi bias to the mask "
            "it builds for the local shard, which does not describe the full sequence under sequence "
            "parallelism, so ulysses_sp refuses it; set alibi=False (rotary positions) or train without SP"
        )
    if any(hasattr(m, "prepare_dynamic_mask") for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} computes a dynamic attention mask from each layer's values (prepare_dynamic_mask, "
            "e.g. Doge): on a shard of the sequence that mask sees only the local tokens, so it cannot describe "
            "the full sequence under sequence parallelism, and ulysses_sp refuses the model; train it without SP"
        )
    if not hasattr(model, "_can_set_attn_implementation") or not model._can_set_attn_implementation():
        raise ValueError(
            f"{type(model).__name__} does not route attention through transformers' AttentionInterface, "
            "so ulysses_sp cannot wrap it; use a model whose attention calls ALL_ATTENTION_FUNCTIONS"
        )
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "attention_chunk_size", None) and not layer_types:
        raise ValueError(
            f"{type(model).__name__} sets attention_chunk_size={config.attention_chunk_size} but no layer_types, "
            "so ulysses_sp cannot tell which layers attend in chunks (Llama 4 marks them 'chunked_attention'); "
            "upgrade transformers or train this model without sequence parallelism"
        )
    if "chunked_attention" in layer_types and impl.startswith("flash_attention"):
        raise ValueError(
            f"{type(model).__name__} has chunked-attention layers (attention_chunk_size="
            f"{config.attention_chunk_size}), which ulysses_sp computes on sdpa, flex_attention and eager, "
            f"not on {impl}; pass attn_implementation='sdpa' or 'flex_attention'"
        )
    mixer_layers = [t for t in _layer_kinds(config) if t not in SUPPORTED_LAYER_TYPES + TOKENWISE_LAYER_TYPES]
    found = mixers.find(model)
    if mixer_layers and len(mixer_layers) != len(found):
        raise ValueError(
            f"{type(model).__name__} has {len(mixer_layers)} layers of type {sorted(set(mixer_layers))}, of which "
            f"ulysses_sp can run {len(found)} under sequence parallelism: it supports {list(SUPPORTED_LAYER_TYPES)} "
            "layers and the linear-attention / SSM / convolution mixers listed in docs/hybrid-models.md"
        )
    if found and ring_size_of(topology) > 1:
        raise ValueError(
            f"{type(model).__name__} has {len(found)} linear-attention / SSM / convolution layers, which ulysses_sp "
            f"runs over the Ulysses all-to-all only, not on a ring (ring_size={topology.ring_size}: the ring's "
            "load-balanced layout has no state passing for them); use ring_size=1"
        )
    heads = getattr(config, "num_attention_heads", None)
    if heads is None and mixer_layers and not any(t in SUPPORTED_LAYER_TYPES for t in layer_types):
        return  # no attention at all (Mamba, Mamba2): every layer is a mixer, nothing to plan here
    _validate_positions(model)
    if heads is None:
        raise ValueError(f"{type(config).__name__} has no num_attention_heads; cannot plan the head split")
    kv = getattr(config, "num_key_value_heads", None) or heads
    if isinstance(heads, int) and isinstance(kv, int) and heads % kv:
        raise ValueError(
            f"{type(model).__name__} has num_attention_heads={heads}, not a multiple of num_key_value_heads={kv}; "
            "ulysses_sp gives each rank whole query heads plus the key/value heads they read, which needs every kv "
            "head to serve the same number of query heads (num_attention_heads % num_key_value_heads == 0)"
        )
    if ring_size_of(topology) > 1:
        _validate_ring(topology, heads, impl, config)
    ulysses = ulysses_of(topology)[0]
    plan_heads(heads, kv, ulysses)  # raises on more Ulysses ranks than heads
    check_int("head_chunks", head_chunks)
    if head_chunks > 1:
        if not isinstance(kv, int) or kv % head_chunks:
            raise ValueError(
                f"head_chunks={head_chunks} must divide num_key_value_heads={kv}: a chunk holds whole key/value "
                f"heads with their query heads; use one of {[c for c in range(1, kv + 1) if kv % c == 0]}"
            )
        if _has_selective_checkpointing(model):
            raise ValueError(SELECTIVE_WITH_CHUNKS)
        if heads // head_chunks < ulysses:
            raise ValueError(
                f"head_chunks={head_chunks} leaves {heads // head_chunks} query heads per chunk, fewer than "
                f"the {ulysses} ranks of the all-to-all (sp_size={topology.sp_size}): every one needs a query head "
                f"of each chunk; use head_chunks <= {heads // ulysses}"
            )
    check_installed(impl)


def _layer_kinds(config) -> list[str]:
    """Each layer's kind: ``config.layer_types``, or where a config has none, its older per-layer list
    ``layers_block_type`` with "attention" read as full attention. RecurrentGemma in transformers 5.17 has
    only ``layers_block_type`` (["recurrent", "attention", ...]): without it, its recurrent layers would run
    on the shard alone, a silent wrong result instead of a refusal."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return list(layer_types)
    legacy = getattr(config, "layers_block_type", None) or []
    return ["full_attention" if kind == "attention" else kind for kind in legacy]


def _validate_ring(topology: SPTopology, heads: int, impl: str, config) -> None:
    u, r = topology.ulysses_size, topology.ring_size
    if "chunked_attention" in (getattr(config, "layer_types", None) or []) or getattr(
        config, "attn_temperature_tuning", False
    ):
        raise ValueError(
            f"ring attention (ring_size={r}) does not compute Llama 4's chunked attention or its position-scaled "
            "NoPE queries (both follow contiguous positions, the ring's layout is load-balanced); use ring_size=1"
        )
    if impl not in RING_BACKENDS:
        raise ValueError(
            f"ring attention (ring_size={r}) runs on attn_implementation in {list(RING_BACKENDS)} (their block "
            f"kernels return the log-sum-exp the ring merges with), not {impl!r}; load the model with "
            "attn_implementation='sdpa', or use ring_size=1"
        )
    if u > heads:
        raise ValueError(
            f"sp_size={topology.sp_size} with ring_size={r} leaves {u} Ulysses ranks, more than "
            f"num_attention_heads={heads}: every Ulysses rank needs at least one query head. Use "
            f"ring_size={smallest_ring(topology.sp_size, heads)} (the smallest that fits)"
        )


def _validate_positions(model) -> None:
    """Refuse models whose positions do not follow the global position ids SP hands them."""
    backbone = model.base_model
    if "position_ids" not in inspect.signature(backbone.forward).parameters:
        raise ValueError(
            f"{type(model).__name__}'s backbone ({type(backbone).__name__}) takes no position_ids: it numbers "
            "positions from the start of each call, which under sequence parallelism is the start of the shard, "
            "so ulysses_sp refuses it (e.g. BART-style decoders with learned positions); train it without SP"
        )
    if any(hasattr(m, "create_position_ids_from_input_ids") for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} derives its position ids from the token ids (offset past padding_idx, "
            "skipping padding tokens, e.g. RoBERTa), which a shard cannot do for the full sequence and "
            "ulysses_sp's global position ids do not reproduce, so ulysses_sp refuses it; train it without SP"
        )


def _swap_configs(model, text_config, name: str) -> list:
    """Give every module a private copy of its config; set ``name`` on the copied text config."""
    copies: dict[int, object] = {}
    refs = []
    for module in model.modules():
        cfg = module.__dict__.get("config")
        if not isinstance(cfg, transformers.PretrainedConfig):
            continue
        if id(cfg) not in copies:
            copies[id(cfg)] = copy.deepcopy(cfg)
        refs.append((module, cfg))
        module.config = copies[id(cfg)]
    copies[id(text_config)]._attn_implementation_internal = name
    return refs


def apply(
    model: torch.nn.Module, topology: SPTopology, attn_implementation: str | None = None, *, head_chunks: int = 1
):
    """Wrap the attention of ``model`` (only) with Ulysses SP over ``topology``; returns ``model``.

    ``model``: a transformers causal LM, or a PEFT model wrapping one (LoRA adapters; SP goes on the
    model inside, see wrappers.py), or a Qwen2.5-VL / Qwen3-VL model (called with the full sample on
    every rank, vlm.py). ``attn_implementation`` picks the core kernel run over the full sequence
    (default: the model's own, e.g. "sdpa"). ``head_chunks`` > 1 runs each attention call's heads in
    that many groups of whole kv heads, each recomputed in the backward, so the attention's
    full-sequence working set is that of one group (attention.py; docs/memory.md). Afterwards call
    the model with the local shard:
    ``model(input_ids=[B, S/P], position_ids=[B, S/P] global positions)``, ideally the output of
    :func:`ulysses_sp.shard_batch`; outputs are the local shard's.
    """
    _check_transformers()
    check_adapters(model)
    inner = unwrap(model)
    if not isinstance(inner, transformers.PreTrainedModel):
        raise ValueError(
            "ulysses_sp.apply expects a transformers PreTrainedModel (or a PEFT model wrapping one), "
            f"got {type(inner).__name__}"
        )
    if is_applied(inner):
        raise ValueError("ulysses_sp is already applied to this model; call ulysses_sp.remove(model) first")
    config = inner.config
    text_config = config.get_text_config(decoder=True)
    composite = text_config is not config
    if composite:
        vlm.check_supported(inner, ring_size_of(topology))
    original = config._attn_implementation or "sdpa"
    impl = attn_implementation or original
    if impl.startswith("ulysses_sp"):
        raise ValueError("the model's attention is already a ulysses_sp wrapper (applied to a shared config?)")
    language = vlm.language_model(inner) if composite else inner
    _validate(language, text_config, topology, impl, head_chunks)
    patched = mixers.patch(inner, topology)  # raises before any change when a mixer cannot be split
    attention = UlyssesAttention(topology, impl, head_chunks)
    name = f"ulysses_sp_{next(_names)}"
    _attention_interface().register(name, attention)
    refs = _swap_configs(inner, text_config, name)
    # the hook completes the backbone's call; in a VLM it shards the language model's full-sequence inputs
    backbone = vlm.language_model(inner) if composite else inner.base_model
    params = tuple(inspect.signature(backbone.forward).parameters)
    complete = vlm.shard_language_inputs if composite else complete_kwargs
    hook = backbone.register_forward_pre_hook(_make_pre_hook(inner, complete), with_kwargs=True)
    if composite:  # packed rows: the mRoPE positions of each document, before the model numbers the row whole
        outer_hook = inner.model.register_forward_pre_hook(
            vlm.make_document_positions_hook(inner.model), with_kwargs=True
        )
    elif backbone is not inner:
        outer_hook = inner.register_forward_pre_hook(_make_outer_hook(inner), with_kwargs=True)
    else:
        outer_hook = None
    # transformers' registry is process-global: without this a model freed unremoved would leave its
    # attention, and through it the topology's process groups, alive until interpreter exit
    unregister = weakref.finalize(inner, _unregister, name)
    inner._ulysses_sp = _State(topology, attention, refs, hook, outer_hook, params, unregister, patched)
    return model


def _unregister(name: str) -> None:
    _attention_interface()._global_mapping.pop(name, None)


def remove(model: torch.nn.Module):
    """Undo :func:`apply` (on ``model`` or the PEFT wrapper around it): original configs (and
    attention), the mixers' own forwards, no hook, name unregistered."""
    inner = unwrap(model)
    state: _State | None = getattr(inner, "_ulysses_sp", None)
    if state is None:
        raise ValueError("ulysses_sp is not applied to this model")
    state.hook.remove()
    if state.outer_hook is not None:
        state.outer_hook.remove()
    for module, cfg in state.config_refs:
        module.config = cfg
    state.unregister()
    state.mixers.restore()
    del inner._ulysses_sp
    return model


def _make_pre_hook(model, complete):
    def pre_hook(module, args, kwargs):
        state: _State = model._ulysses_sp
        kwargs = {**dict(zip(state.forward_params, args)), **kwargs}
        for key, value in state.call.items():  # what the model's head did not pass on
            if kwargs.get(key) is None:
                kwargs[key] = value
        state.call = {}
        kwargs = complete(kwargs, state.topology)
        state.mixers.info = kwargs.get(SEQ_INFO_KWARG)  # for mixers whose layer drops the keyword (Jamba)
        return (), kwargs

    return pre_hook


def _make_outer_hook(model):
    def outer_hook(module, args, kwargs):
        model._ulysses_sp.call = {k: kwargs[k] for k in ("position_ids", SEQ_INFO_KWARG) if kwargs.get(k) is not None}

    return outer_hook
