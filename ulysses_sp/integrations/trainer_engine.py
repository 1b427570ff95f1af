"""Which engine :class:`~ulysses_sp.integrations.hf_trainer.SPTrainer` trains with: DDP, DeepSpeed
(Accelerate's DeepSpeed plugin) or FSDP2, and the FSDP settings it can honour.

FSDP2 is requested by Accelerate's FSDP plugin (``distributed_type: FSDP`` in an Accelerate config),
by the ``ACCELERATE_USE_FSDP`` / ``FSDP_*`` variables ``accelerate launch`` sets from such a config,
or by ``TrainingArguments(fsdp=..., fsdp_config=...)``. SPTrainer then shards the model itself with
:func:`~ulysses_sp.integrations.fsdp2.shard_causal_lm` instead of letting Accelerate wrap it, for two
reasons: Accelerate's FSDP2 wraps the transformers model (the head in the root unit, gathered
through the whole step, and a root our sharded loss never calls), and on CPU processes Accelerate
does not turn FSDP on at all: the stock Trainer under an FSDP config trains as plain DDP without a
word. Reading the request here makes both cases shard the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

ENGINES = ("ddp", "deepspeed", "fsdp2")


@dataclass(frozen=True)
class FSDPRequest:
    """The FSDP settings of a Trainer run, wherever they were given (module docstring)."""

    version: int
    reshard_after_forward: bool
    offload_params: bool
    cpu_ram_efficient_loading: bool
    activation_checkpointing: bool
    source: str  # where the request came from, for messages


def _true(value) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes")


def fsdp_request(trainer) -> FSDPRequest | None:
    """The FSDP request of ``trainer`` (a transformers Trainer after its Accelerator exists), or None."""
    if trainer.is_fsdp_enabled:
        plugin = trainer.accelerator.state.fsdp_plugin
        offload = plugin.cpu_offload
        return FSDPRequest(
            version=int(plugin.fsdp_version),
            reshard_after_forward=plugin.reshard_after_forward is True,
            offload_params=bool(getattr(offload, "offload_params", offload)),
            cpu_ram_efficient_loading=bool(plugin.cpu_ram_efficient_loading),
            activation_checkpointing=bool(plugin.activation_checkpointing),
            source="Accelerate's FSDP plugin",
        )
    args = trainer.args
    if args.fsdp:
        config = args.fsdp_config or {}
        return FSDPRequest(
            version=int(config.get("version", 2)),
            reshard_after_forward=_true(config.get("reshard_after_forward", True)),
            offload_params=_true(config.get("cpu_offload", False)),
            cpu_ram_efficient_loading=_true(config.get("cpu_ram_efficient_loading", False)),
            activation_checkpointing=_true(config.get("activation_checkpointing", False)),
            source="TrainingArguments.fsdp",
        )
    env = os.environ
    if _true(env.get("ACCELERATE_USE_FSDP", "false")):
        return FSDPRequest(
            version=int(env.get("FSDP_VERSION", "1")),
            reshard_after_forward=_true(env.get("FSDP_RESHARD_AFTER_FORWARD", "true")),
            offload_params=_true(env.get("FSDP_OFFLOAD_PARAMS", "false")),
            cpu_ram_efficient_loading=_true(env.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")),
            activation_checkpointing=_true(env.get("FSDP_ACTIVATION_CHECKPOINTING", "false")),
            source="the Accelerate config (ACCELERATE_USE_FSDP)",
        )
    return None


def fsdp_refusals(request: FSDPRequest | None) -> dict[str, bool]:
    """The FSDP settings SPTrainer cannot honour -> whether ``request`` sets them."""
    if request is None:
        return {}
    where = f" ({request.source})"
    return {
        f"FSDP version {request.version}{where}: SPTrainer shards with FSDP2; set fsdp_version: 2": request.version
        != 2,
        f"FSDP parameter offload{where}: not wired into SP's sharding; turn fsdp_offload_params off": (
            request.offload_params
        ),
        f"fsdp_cpu_ram_efficient_loading{where}: every rank must hold the model's weights when SPTrainer shards "
        "it (rank 0's are broadcast); turn it off": request.cpu_ram_efficient_loading,
        f"FSDP activation checkpointing{where}: use TrainingArguments(gradient_checkpointing=True) or "
        "ulysses_sp.enable_checkpointing, which keep the attention's all-to-all out of the recompute "
        "(selective)": request.activation_checkpointing,
    }


def engine_name(trainer, request: FSDPRequest | None) -> str:
    """``"deepspeed"``, ``"fsdp2"`` or ``"ddp"`` (also for one process)."""
    if trainer.is_deepspeed_enabled:
        return "deepspeed"
    return "fsdp2" if request is not None else "ddp"
