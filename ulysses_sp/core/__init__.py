"""The SP core: topology, every collective, the head plan and the all-to-all, the attention wrapper
and its kernels, masks, the sequence layout, sharding, apply/remove, random streams, the logger.

Imports nothing from the other subpackages (docs/architecture.md).
"""
