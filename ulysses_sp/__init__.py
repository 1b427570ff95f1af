"""ulysses_sp: Ulysses sequence parallelism for Hugging Face transformers models.

Each rank of an SP group holds S/P tokens of every sequence; inside every attention call the
tokens are re-sharded by heads (all-to-all), attention runs over the full sequence, and the
output is re-sharded back. See README.md and docs/ for usage; docs/architecture.md maps the
subpackages (core, loss, data, memory, integrations, train) and the data flow of one step.

This module is the public API: the names in ``__all__``.
"""

from .core.apply import apply, is_applied, remove
from .core.backends import SUPPORTED as SUPPORTED_ATTENTION
from .core.rng import sharded_rng, sync_rng
from .core.sequence_info import SEQ_INFO_KWARG, SequenceInfo, build_sequence_info
from .core.sharding import shard_batch, to_device
from .core.topology import SPTopology, init_sp
from .data.loader import SPDataLoader, SPShardAdapter
from .data.text import load_text_dataset
from .integrations.accelerate import prepare_sp, train_step
from .integrations.accelerate_env import claim_sp_size
from .loss.causal_lm import CausalLMLoss, causal_lm_loss, count_label_tokens, reduce_loss_for_logging
from .memory.activation_checkpointing import disable_checkpointing, enable_checkpointing, gradient_checkpointing_kwargs
from .memory.rms_norm import disable_rms_norm_recompute, enable_rms_norm_recompute
from .memory.tiled_mlp import tile_mlp, untile_mlp

__version__ = "0.1.0"

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
    "count_label_tokens",
    "disable_checkpointing",
    "disable_rms_norm_recompute",
    "enable_checkpointing",
    "enable_rms_norm_recompute",
    "gradient_checkpointing_kwargs",
    "init_sp",
    "is_applied",
    "load_text_dataset",
    "prepare_sp",
    "reduce_loss_for_logging",
    "remove",
    "shard_batch",
    "sharded_rng",
    "sync_rng",
    "tile_mlp",
    "to_device",
    "train_step",
    "untile_mlp",
]
