"""DeepSpeed: an mpu built from SPTopology, the SP size from the DeepSpeed JSON, and the
gradient-scale correction each ZeRO stage needs.

What DeepSpeed asks of an ``mpu`` (``deepspeed.initialize(mpu=...)``):
 - sequence-parallel group: the SP group;
 - sequence-data-parallel group: every rank (dp x sp); ZeRO partitions and gradient reductions
   span it;
 - data-parallel group: ranks holding different samples (batch arithmetic: train_batch_size =
   micro x accumulation x dp_size);
 - tensor/model/pipeline parallel: size 1, on singleton groups (asked for by the bf16 optimizer at
   stage 0, which is where DeepSpeed's own ALST mpu crashes, DeepSpeed #7833, and by gradient
   clipping, which must not sum norms across SP ranks holding the same parameters).

Gradient scale: with our loss convention (loss.py) the SP ranks' gradients sum to P x the
reference. DeepSpeed 0.19.8 sums gradients over the sp x dp ranks and divides by dp only (stages
0-2, measured on CPU/gloo), leaving P x the reference; :func:`loss_scale` returns the factor the
loss must be multiplied by before ``engine.backward`` so that the reduced gradient is the
reference's.
"""

from __future__ import annotations

import json
import os

import torch.distributed as dist

from ..topology import SPTopology


class SPMpu:
    """The model-parallel-unit interface DeepSpeed queries, answered from an SPTopology."""

    def __init__(self, topology: SPTopology):
        self.topology = topology
        self._world = dist.group.WORLD
        self._single, _ = dist.new_subgroups(group_size=1)  # collective: every rank gets its own

    # sequence parallel
    def get_sequence_parallel_group(self):
        return self.topology.sp_group

    def get_sequence_parallel_world_size(self) -> int:
        return self.topology.sp_size

    def get_sequence_parallel_rank(self) -> int:
        return self.topology.sp_rank

    # sequence x data parallel: all ranks
    def get_sequence_data_parallel_group(self):
        return self._world

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.topology.world_size

    def get_sequence_data_parallel_rank(self) -> int:
        return self.topology.rank

    # data parallel: ranks that read different samples
    def get_data_parallel_group(self):
        return self.topology.dp_group

    def get_data_parallel_world_size(self) -> int:
        return self.topology.dp_size

    def get_data_parallel_rank(self) -> int:
        return self.topology.dp_rank

    def get_data_parallel_group_ranks(self) -> list[int]:
        return [d * self.topology.sp_size + self.topology.sp_rank for d in range(self.topology.dp_size)]

    # no tensor / pipeline model parallelism
    def get_model_parallel_group(self):
        return self._single

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0


def load_config(config: str | dict | None) -> dict:
    """A DeepSpeed config from a JSON path or dict; clear errors for a missing/malformed file."""
    if config is None:
        return {}
    if isinstance(config, dict):
        return dict(config)
    if not os.path.isfile(config):
        raise ValueError(f"DeepSpeed config file {config!r} does not exist (see configs/deepspeed/ for examples)")
    try:
        with open(config) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"DeepSpeed config {config!r} is not valid JSON: {e}") from None


def resolve_sp_size(cli_sp_size: int | None, ds_config: dict) -> int:
    """``--sp-size`` overrides the JSON's ``sequence_parallel_size``; both given and different is an error."""
    json_sp = ds_config.get("sequence_parallel_size")
    if cli_sp_size is not None and json_sp is not None and int(json_sp) != cli_sp_size:
        raise ValueError(
            f"--sp-size {cli_sp_size} disagrees with \"sequence_parallel_size\": {json_sp} in the DeepSpeed config; "
            "give one of them, or make them equal"
        )
    return cli_sp_size if cli_sp_size is not None else int(json_sp or 1)


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def loss_scale(ds_config: dict, topology: SPTopology) -> float:
    """Multiply the loss by this before ``engine.backward`` (see module docstring)."""
    return 1.0 / topology.sp_size
