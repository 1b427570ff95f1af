"""What a run resolves before distributed init: the device, dtype, model config, DeepSpeed config,
SP size, attention kernel and the checkpoint to resume, each checked here.

Every rank has the same flags and files, so an error here is raised on every rank alike and none is
left waiting in a collective (the flag values themselves are checked by TrainConfig).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..core.backends.flash import check_installed
from ..core.heads import smallest_ring
from ..core.ring import RING_BACKENDS
from ..data.text import Documents, read_documents
from ..integrations.accelerate_env import launched_deepspeed_config_file, launched_engine
from ..integrations.deepspeed_config import load_config
from ..integrations.deepspeed_config import zero_stage as ds_zero_stage
from ..integrations.sp_size import parse_ring_size, resolve_ring_size, resolve_sp_size
from . import checkpoints
from .config import TrainConfig
from .presets import build_config, model_source

TORCH_DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class RunPlan:
    """The run's settings resolved against this machine and its files (see the module docstring)."""

    config: TrainConfig
    device_type: str
    dtype: torch.dtype
    model_config: object  # the transformers PretrainedConfig of --model
    attention: str
    deepspeed_config_path: str | None  # --deepspeed, or the one an Accelerate DeepSpeed launch names
    ds_config: dict
    sp_size: int
    ring_size: int  # hybrid SP: ring attention across ring_size Ulysses groups (1: Ulysses only)
    zero_stage: int | None
    settings: dict  # what a checkpoint must share with this run (checkpoints.run_settings)
    resume: checkpoints.Checkpoint | None
    documents: Documents  # the dataset, read and checked

    @property
    def engine_name(self) -> str:
        return engine_name(self.config, self.deepspeed_config_path)


def engine_name(config: TrainConfig, deepspeed_config_path: str | None) -> str:
    """deepspeed (a DeepSpeed JSON), fsdp2 (--fsdp) or torch."""
    if deepspeed_config_path:
        return "deepspeed"
    return "fsdp2" if config.fsdp else "torch"


def make_plan(config: TrainConfig) -> RunPlan:
    """Resolve and check ``config`` against this machine and its files (module docstring)."""
    device_type = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = TORCH_DTYPES[config.dtype or ("bf16" if device_type == "cuda" else "fp32")]
    check_device_dtype(device_type, dtype)
    # what needs only the file system first: a wrong path fails before transformers is imported
    model_source(config.model)
    documents = read_training_documents(config.dataset)
    ds_path = config.deepspeed or launched_deepspeed_config_file()  # accelerate launch with DEEPSPEED: its file
    if ds_path and config.fsdp:
        raise ValueError(
            f"--fsdp under an accelerate launch of DeepSpeed ({ds_path}) names two engines; launch with an "
            "Accelerate config without DeepSpeed (configs/accelerate/fsdp2_sp2.yaml), or leave out --fsdp"
        )
    ds_config = load_config(ds_path)
    check_accelerate_launch(ds_config, fsdp=config.fsdp)
    sp_size = resolve_sp_size(config.sp_size, ds_config)  # CLI, DeepSpeed JSON, Accelerate config
    resume = checkpoints.find_checkpoint(config.resume) if config.resume else None
    model_config = build_config(config.model)
    ring = None if config.ring_size is None else parse_ring_size(config.ring_size)
    # CLI, DeepSpeed JSON, Accelerate config; "auto" by the heads and the ranks per node
    ring_size = resolve_ring_size(ring, sp_size, model_config, ds_config)
    attention = config.attn or default_attention(device_type)
    check_installed(attention)
    if config.liger_ops:
        check_liger_ops(device_type)
    check_ring(ring_size, sp_size, model_config, attention)
    check_seq_len(model_config, config.seq_len, config.allow_longer_than_max_positions)
    settings = checkpoints.run_settings(config, model_config)
    if resume is not None:
        checkpoints.check_compatible(resume, settings, engine_name(config, ds_path))
    zero_stage = ds_zero_stage(ds_config) if ds_path else None
    if config.compile and zero_stage == 3:
        raise ValueError(
            f"--compile with ZeRO-3 ({ds_path}): DeepSpeed gathers each partitioned weight in hooks of every "
            "module inside the compiled layers, which torch.compile cannot trace; use --fsdp (FSDP2 composes with "
            "compiled layers) or a ZeRO stage of 0 to 2, or leave out --compile"
        )
    return RunPlan(
        config,
        device_type,
        dtype,
        model_config,
        attention,
        ds_path,
        ds_config,
        sp_size,
        ring_size,
        zero_stage,
        settings,
        resume,
        documents,
    )


def read_training_documents(path: str | None) -> Documents:
    """The documents of ``--dataset`` (None: the bundled corpus); ValueError for a missing or unreadable
    path and for a dataset without a document of 2 tokens (nothing to predict a next token of)."""
    where = "the bundled corpus" if path is None else path
    try:
        documents = read_documents(path)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"--dataset {where}: {e}") from None
    longest = int(documents.lengths.max())
    if longest < 2:
        raise ValueError(
            f"--dataset {where}: every one of its {len(documents)} documents is {longest} token long; a "
            "document needs at least 2 tokens to have a next-token target"
        )
    return documents


def check_accelerate_launch(ds_config: dict, environ: Mapping[str, str] | None = None, *, fsdp: bool = False) -> None:
    """ValueError for an ``accelerate launch`` whose engine this trainer would silently not use: DeepSpeed
    configured in the YAML itself (no ``deepspeed_config_file`` to read, and no ``--deepspeed``), or FSDP
    without ``--fsdp`` (with it, the FSDP2 engine shards the model itself: Accelerate's FSDP plugin is
    not used, and it does not shard CPU processes at all)."""
    env = os.environ if environ is None else environ
    engine = launched_engine(env)
    if engine == "deepspeed" and not ds_config:
        source = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or "(set in the Accelerate config's deepspeed_config)"
        raise ValueError(
            f"accelerate launched DeepSpeed (deepspeed_config_file {source}), but launch/train.py trains "
            f"with DeepSpeed only when given --deepspeed: add --deepspeed CONFIG.json to its arguments"
        )
    if engine == "fsdp" and not fsdp:
        raise ValueError(
            "accelerate launched FSDP; launch/train.py trains with its FSDP2 engine only when given --fsdp: add "
            "--fsdp to its arguments (configs/accelerate/fsdp2_sp2.yaml), or use an Accelerate config with "
            "distributed_type MULTI_GPU (configs/accelerate/sp2.yaml) or DEEPSPEED"
        )


def check_ring(ring_size: int, sp_size: int, model_config, attention: str) -> None:
    """ValueError before any process group when the ring cannot run this model (the same checks as
    apply, made on every rank from the command line and the configs alone; resolve_ring_size has
    checked that the ring size divides the SP size)."""
    if ring_size == 1:
        return
    heads = model_config.num_attention_heads
    if sp_size // ring_size > heads:
        raise ValueError(
            f"SP size {sp_size} with ring size {ring_size} leaves {sp_size // ring_size} Ulysses ranks for "
            f"{heads} attention heads; use --ring-size {smallest_ring(sp_size, heads)} or auto"
        )
    if attention not in RING_BACKENDS:
        raise ValueError(
            f"ring size {ring_size}: ring attention runs with --attn in {list(RING_BACKENDS)}, not {attention!r}"
        )


def check_liger_ops(device_type: str) -> None:
    """--liger-ops: liger-kernel importable, on CUDA (its triton kernels)."""
    if device_type != "cuda":
        raise ValueError(
            f"--liger-ops runs liger-kernel's triton kernels, which need CUDA; on {device_type} leave it out "
            "(the model keeps its torch ops)"
        )
    from ..memory.fused_ops import liger_kernels  # transformers: after the file checks

    liger_kernels()  # ValueError with the install command when liger-kernel or triton is missing


def default_attention(device_type: str) -> str:
    """flash_attention_2 on CUDA when flash-attn is installed (with or without a ring: the ring has a
    flash-attn varlen block kernel), else sdpa."""
    if device_type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def check_device_dtype(device_type: str, dtype: torch.dtype) -> None:
    """ValueError for a device that is not there or a dtype the device cannot train in."""
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "--device cuda was given but no CUDA device is visible (torch.cuda.is_available() is "
            "False); use --device cpu, or check CUDA_VISIBLE_DEVICES and the torch build"
        )
    if device_type == "cpu" and dtype == torch.float16:
        raise ValueError(
            "--dtype fp16 is not supported on CPU (DeepSpeed's CPU accelerator has no fp16 and "
            "torch's CPU fp16 kernels are partial); use --dtype fp32 or bf16"
        )
    if device_type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name()
        raise ValueError(
            f"--dtype bf16 needs a GPU with bfloat16 support (compute capability >= 8.0); "
            f"{name} has none: use --dtype fp16 (DeepSpeed loss scaling) or fp32"
        )


def check_seq_len(config, seq_len: int, allow_longer: bool) -> None:
    """Refuse ``seq_len`` beyond the model's ``max_position_embeddings`` unless ``allow_longer``.

    A rotary (RoPE) model computes positions past its limit, but it was trained (and its
    ``rope_scaling`` chosen) for that limit: a longer ``--seq-len`` is either a typo or a context
    extension, which should be asked for (``allow_longer`` then warns). A model with learned absolute
    position embeddings has no row for such positions and is refused either way: the embedding
    lookup would fail on the ranks holding the late shards only, leaving the others waiting.
    """
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0 or seq_len <= limit:
        return
    rotary = getattr(config, "rope_parameters", None) is not None or getattr(config, "rope_theta", None) is not None
    if not rotary:
        raise ValueError(
            f"--seq-len {seq_len} exceeds max_position_embeddings={limit} of {type(config).__name__}, "
            f"which has learned absolute position embeddings (no rows past {limit}); use --seq-len <= "
            f"{limit}"
        )
    if not allow_longer:
        raise ValueError(
            f"--seq-len {seq_len} exceeds max_position_embeddings={limit} of {type(config).__name__}; "
            f"use --seq-len <= {limit}, or pass --allow-longer-than-max-positions to train past it "
            f"(RoPE extrapolates; consider rope_scaling in the model's config.json)"
        )
    warnings.warn(
        f"--seq-len {seq_len} exceeds max_position_embeddings={limit}: RoPE positions past the "
        f"model's trained range (--allow-longer-than-max-positions)",
        stacklevel=2,
    )
