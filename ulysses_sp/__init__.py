"""ulysses_sp: Ulysses sequence parallelism for Hugging Face transformers models.

Each rank of an SP group holds S/P tokens of every sequence; inside every attention call the
tokens are re-sharded by heads (all-to-all), attention runs over the full sequence, and the
output is re-sharded back. See README.md and docs/ for usage; docs/architecture.md maps the
subpackages (core, loss, data, memory, integrations, train) and the data flow of one step.

This module is the public API: the names in ``__all__``. They are imported on first use (PEP 562),
so that ``import ulysses_sp.train.cli`` checks a command line without loading transformers first:
a bad flag fails in a second, not after every heavy import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

#: public name -> (module that defines it, its name there)
_PUBLIC = {
    "apply": ("core.apply", "apply"),
    "is_applied": ("core.apply", "is_applied"),
    "remove": ("core.apply", "remove"),
    "SUPPORTED_ATTENTION": ("core.backends", "SUPPORTED"),
    "sharded_rng": ("core.rng", "sharded_rng"),
    "sync_rng": ("core.rng", "sync_rng"),
    "SEQ_INFO_KWARG": ("core.sequence_info", "SEQ_INFO_KWARG"),
    "SequenceInfo": ("core.sequence_info", "SequenceInfo"),
    "build_sequence_info": ("core.sequence_info", "build_sequence_info"),
    "shard_batch": ("core.sharding", "shard_batch"),
    "gather_tokens": ("core.per_token", "gather_tokens"),
    "shard_tokens": ("core.per_token", "shard_tokens"),
    "token_logprobs": ("loss.logprobs", "token_logprobs"),
    "policy_loss": ("loss.policy", "policy_loss"),
    "count_policy_items": ("loss.policy", "count_policy_items"),
    "to_device": ("core.sharding", "to_device"),
    "SPTopology": ("core.topology", "SPTopology"),
    "init_sp": ("core.topology", "init_sp"),
    "SPDataLoader": ("data.loader", "SPDataLoader"),
    "SPShardAdapter": ("data.loader", "SPShardAdapter"),
    "load_text_dataset": ("data.text", "load_text_dataset"),
    "prepare_sp": ("integrations.accelerate", "prepare_sp"),
    "train_step": ("integrations.accelerate", "train_step"),
    "claim_sp_size": ("integrations.accelerate_env", "claim_sp_size"),
    "shard_causal_lm": ("integrations.fsdp2", "shard_causal_lm"),
    "CausalLMLoss": ("loss.causal_lm", "CausalLMLoss"),
    "causal_lm_loss": ("loss.causal_lm", "causal_lm_loss"),
    "count_label_tokens": ("loss.causal_lm", "count_label_tokens"),
    "reduce_loss_for_logging": ("loss.causal_lm", "reduce_loss_for_logging"),
    "disable_checkpointing": ("memory.activation_checkpointing", "disable_checkpointing"),
    "enable_checkpointing": ("memory.activation_checkpointing", "enable_checkpointing"),
    "gradient_checkpointing_kwargs": ("memory.activation_checkpointing", "gradient_checkpointing_kwargs"),
    "compile_layers": ("memory.compile", "compile_layers"),
    "fuse_elementwise": ("memory.fused_ops", "fuse_elementwise"),
    "unfuse_elementwise": ("memory.fused_ops", "unfuse_elementwise"),
    "uncompile_layers": ("memory.compile", "uncompile_layers"),
    "disable_rms_norm_recompute": ("memory.rms_norm", "disable_rms_norm_recompute"),
    "enable_rms_norm_recompute": ("memory.rms_norm", "enable_rms_norm_recompute"),
    "tile_mlp": ("memory.tiled_mlp", "tile_mlp"),
    "untile_mlp": ("memory.tiled_mlp", "untile_mlp"),
}

__all__ = [
    "CausalLMLoss",
    "SEQ_INFO_KWARG",
    "SPDataLoader",
    "SPShardAdapter",
    "SPTopology",
    "SUPPORTED_ATTENTION",
    "SequenceInfo",
    "apply",
    "build_sequence_info",
    "causal_lm_loss",
    "claim_sp_size",
    "compile_layers",
    "count_label_tokens",
    "count_policy_items",
    "disable_checkpointing",
    "disable_rms_norm_recompute",
    "enable_checkpointing",
    "enable_rms_norm_recompute",
    "fuse_elementwise",
    "gather_tokens",
    "gradient_checkpointing_kwargs",
    "init_sp",
    "is_applied",
    "load_text_dataset",
    "policy_loss",
    "prepare_sp",
    "reduce_loss_for_logging",
    "remove",
    "shard_batch",
    "shard_causal_lm",
    "shard_tokens",
    "sharded_rng",
    "sync_rng",
    "tile_mlp",
    "to_device",
    "token_logprobs",
    "train_step",
    "uncompile_layers",
    "unfuse_elementwise",
    "untile_mlp",
]


assert sorted(__all__) == sorted(_PUBLIC), "every public name is resolved by __getattr__"


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'ulysses_sp' has no attribute {name!r}")
    module, attribute = _PUBLIC[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attribute)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from .core.apply import apply, is_applied, remove
    from .core.backends import SUPPORTED as SUPPORTED_ATTENTION
    from .core.per_token import gather_tokens, shard_tokens
    from .core.rng import sharded_rng, sync_rng
    from .core.sequence_info import SEQ_INFO_KWARG, SequenceInfo, build_sequence_info
    from .core.sharding import shard_batch, to_device
    from .core.topology import SPTopology, init_sp
    from .data.loader import SPDataLoader, SPShardAdapter
    from .data.text import load_text_dataset
    from .integrations.accelerate import prepare_sp, train_step
    from .integrations.accelerate_env import claim_sp_size
    from .integrations.fsdp2 import shard_causal_lm
    from .loss.causal_lm import CausalLMLoss, causal_lm_loss, count_label_tokens, reduce_loss_for_logging
    from .loss.logprobs import token_logprobs
    from .loss.policy import count_policy_items, policy_loss
    from .memory.activation_checkpointing import (
        disable_checkpointing,
        enable_checkpointing,
        gradient_checkpointing_kwargs,
    )
    from .memory.compile import compile_layers, uncompile_layers
    from .memory.fused_ops import fuse_elementwise, unfuse_elementwise
    from .memory.rms_norm import disable_rms_norm_recompute, enable_rms_norm_recompute
    from .memory.tiled_mlp import tile_mlp, untile_mlp
