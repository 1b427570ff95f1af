"""ulysses_sp: Ulysses sequence parallelism for Hugging Face transformers models.

Each rank of an SP group holds S/P tokens of every sequence; inside every attention call the
tokens are re-sharded by heads (all-to-all), attention runs over the full sequence, and the
output is re-sharded back. See README.md and docs/ for usage.
"""

from .backends import SUPPORTED as SUPPORTED_ATTENTION
from .integrations.hf import apply, is_applied, remove
from .positions import SEQ_INFO_KWARG, SequenceInfo, build_sequence_info
from .topology import SPTopology, init_sp

__version__ = "0.1.0"

__all__ = [
    "SEQ_INFO_KWARG",
    "SUPPORTED_ATTENTION",
    "SPTopology",
    "SequenceInfo",
    "apply",
    "build_sequence_info",
    "init_sp",
    "is_applied",
    "remove",
]
