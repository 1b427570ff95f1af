"""The DeepSpeed config under Ulysses SP: reading it, checking it against the topology, and the
batch sizes (the SP size in it is read by sp_size.py).

DeepSpeed's batch arithmetic is ``train_batch_size = train_micro_batch_size_per_gpu x
gradient_accumulation_steps x dp``, where dp counts the ranks that read *different* samples:
``dp = world / sp``, not the world (every rank of an SP group reads the same sample).
"""

from __future__ import annotations

import copy
import json
import os

from ..core.checks import check_int
from ..core.layout import ring_size_of
from ..core.topology import SPTopology
from .sp_size import DS_RING_KEY

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def load_config(config: str | os.PathLike | dict | None) -> dict:
    """A DeepSpeed config from a JSON path or a dict (copied); clear errors for a missing/malformed file."""
    if config is None:
        return {}
    if isinstance(config, dict):
        return copy.deepcopy(config)
    if not os.path.isfile(config):
        raise ValueError(f"DeepSpeed config file {str(config)!r} does not exist (see configs/deepspeed/ for examples)")
    try:
        with open(config) as f:
            loaded = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"DeepSpeed config {str(config)!r} is not valid JSON: {e}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"DeepSpeed config {str(config)!r} must hold a JSON object, got {type(loaded).__name__}")
    return loaded


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def prepare_config(
    ds_config: dict,
    topology: SPTopology,
    *,
    micro_batch_size: int | None = None,
    gradient_accumulation_steps: int | None = None,
) -> dict:
    """The config to hand to ``deepspeed.initialize`` together with our mpu (a new dict).

    - ``sequence_parallel_size`` / ``data_parallel_size`` are checked against ``topology`` and removed
      (with both present DeepSpeed would build a device mesh of its own that overrides the mpu);
      so is our ``sequence_parallel_ring_size`` (``"auto"`` was resolved by
      :func:`~.sp_size.resolve_ring_size` before the topology was built: not checked again).
    - ``micro_batch_size`` / ``gradient_accumulation_steps`` (the trainer's CLI flags) replace the
      JSON's values; the three batch keys are then completed with dp = world / sp, as DeepSpeed
      would, and written out explicitly. ``"auto"`` in a batch key counts as absent.
    - Any other ``"auto"`` is an error: it is a Hugging Face Trainer placeholder DeepSpeed cannot read.
    """
    cfg = copy.deepcopy(ds_config)
    for key, want in (("sequence_parallel_size", topology.sp_size), ("data_parallel_size", topology.dp_size)):
        value = cfg.pop(key, None)
        if value is not None and value != want:
            raise ValueError(
                f'"{key}": {value} in the DeepSpeed config does not match the topology '
                f"(sp={topology.sp_size}, dp={topology.dp_size}, world={topology.world_size})"
            )
    ring = cfg.pop(DS_RING_KEY, None)
    if ring not in (None, "auto") and ring != ring_size_of(topology):
        raise ValueError(
            f'"{DS_RING_KEY}": {ring} in the DeepSpeed config does not match the topology\'s ring size '
            f"{ring_size_of(topology)} (sp={topology.sp_size}); build it with init_sp(sp_size, ring_size={ring})"
        )
    given = {k: (None if cfg.get(k) == "auto" else cfg.get(k)) for k in BATCH_KEYS}
    if micro_batch_size is not None:
        given["train_micro_batch_size_per_gpu"] = micro_batch_size
    if gradient_accumulation_steps is not None:
        given["gradient_accumulation_steps"] = gradient_accumulation_steps
    cfg.update(zip(BATCH_KEYS, batch_sizes(topology.dp_size, *(given[k] for k in BATCH_KEYS))))
    autos = _auto_keys(cfg)
    if autos:
        raise ValueError(
            f'the DeepSpeed config has "auto" values at {autos}; give concrete values '
            '("auto" is filled in by the Hugging Face Trainer only)'
        )
    return cfg


def batch_sizes(dp: int, train_batch_size=None, micro=None, accumulation=None) -> tuple[int, int, int]:
    """Complete ``(train_batch_size, micro, accumulation)`` with ``train = micro x accumulation x dp``."""
    for name, v in (
        ("train_batch_size", train_batch_size),
        ("train_micro_batch_size_per_gpu", micro),
        ("gradient_accumulation_steps", accumulation),
    ):
        if v is not None:
            check_int(name, v)
    if micro is None and train_batch_size is None:
        raise ValueError(
            "the DeepSpeed config needs train_micro_batch_size_per_gpu or train_batch_size "
            "(or pass the micro batch size from the command line)"
        )
    if micro is None:
        accumulation = accumulation or 1
        micro, rest = divmod(train_batch_size, accumulation * dp)
    elif train_batch_size is None:
        accumulation = accumulation or 1
        train_batch_size, rest = micro * accumulation * dp, 0
    elif accumulation is None:
        accumulation, rest = divmod(train_batch_size, micro * dp)
    else:
        rest = train_batch_size - micro * accumulation * dp
    if rest or micro < 1 or accumulation < 1:
        raise ValueError(
            f"train_batch_size={train_batch_size} must equal train_micro_batch_size_per_gpu={micro} x "
            f"gradient_accumulation_steps={accumulation} x dp={dp}, where dp = world / sp counts the ranks "
            "reading different samples (every rank of an SP group reads the same one)"
        )
    return train_batch_size, micro, accumulation


def _auto_keys(node, path: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _auto_keys(v, f"{path}.{key}" if path else key)]
    return [path] if node == "auto" else []
