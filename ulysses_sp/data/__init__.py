"""The data path: a loader whose SP ranks read the same samples and keep their shard, collation,
packing, text corpora, and the check that an SP group holds one batch.

Depends on core only (docs/architecture.md).
"""

from .collate import collate_padded
from .identical import SPBatchMismatchError, assert_same_across_sp, batch_checksum
from .loader import SPDataLoader, SPShardAdapter
from .packing import PackedDataset, pack_collate
from .text import Documents, load_text_dataset, read_documents

__all__ = [
    "Documents",
    "PackedDataset",
    "SPBatchMismatchError",
    "SPDataLoader",
    "SPShardAdapter",
    "assert_same_across_sp",
    "batch_checksum",
    "collate_padded",
    "load_text_dataset",
    "pack_collate",
    "read_documents",
]
