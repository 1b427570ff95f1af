"""What a run is made of, built from its plan: the process group, the model, the data, the engine."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import transformers

from ..core import comm
from ..core.topology import SPTopology
from ..data.loader import SPDataLoader
from ..data.packing import PackedDataset
from ..data.text import Documents
from .config import TrainConfig
from .engines.deepspeed_engine import DeepSpeedEngine
from .engines.fsdp2_engine import FSDP2Engine
from .engines.torch_engine import TorchEngine
from .evaluation import split_heldout
from .plan import RunPlan


def init_distributed(device_type: str, timeout_s: float) -> None:
    """Join the job torchrun/deepspeed/accelerate started, or a world of one when run directly."""
    if comm.is_initialized():
        return
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    timeout = timedelta(seconds=timeout_s)
    if device_type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        backend, device = "nccl", torch.device("cuda", local)
    else:
        if "OMP_NUM_THREADS" not in os.environ:  # the deepspeed launcher leaves every rank all cores
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        backend, device = "gloo", None
    try:
        comm.init_world(backend, timeout, device)
    except (comm.DistError, RuntimeError) as e:  # a rendezvous timeout is a DistStoreError, or a RuntimeError
        raise RuntimeError(
            f"not every rank joined the job within --timeout-s {timeout_s:g} ({type(e).__name__}: {e}). A rank that "
            "refused its settings before joining (e.g. a file missing on its node) said why in its own log, "
            "prefixed with its rank; a rank that never started: check the launcher"
        ) from e


def build_model(
    name: str, dtype: torch.dtype, device: torch.device, attn: str, config: transformers.PretrainedConfig
) -> transformers.PreTrainedModel:
    """Random init from ``config`` (a preset or config.json); loads weights when the directory has them."""
    config._attn_implementation = "sdpa" if attn.startswith("flash") else attn  # set ours in apply()
    has_weights = os.path.isdir(name) and any(f.endswith((".safetensors", ".bin")) for f in os.listdir(name))
    if has_weights:
        model = transformers.AutoModelForCausalLM.from_pretrained(name, config=config, dtype=dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.to(device).train()


def build_engine(plan: RunPlan, model: torch.nn.Module, topology: SPTopology, load_universal: bool = False):
    """The plan's engine over ``model``: DeepSpeed (ZeRO config of the plan), FSDP2 or torch."""
    config = plan.config
    if plan.engine_name == "deepspeed":
        return DeepSpeedEngine(
            model, topology, plan.ds_config, config, plan.dtype, plan.device_type, load_universal=load_universal
        )
    if plan.engine_name == "fsdp2":
        return FSDP2Engine(
            model,
            topology,
            config.lr,
            compute_dtype=plan.dtype,
            reshard_after_forward=not config.no_reshard_after_forward,
            weight_decay=config.weight_decay,
            max_grad_norm=config.max_grad_norm,
            warmup_steps=config.warmup_steps,
            total_steps=config.steps,
        )
    return TorchEngine(
        model,
        topology,
        lr=config.lr,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        warmup_steps=config.warmup_steps,
        total_steps=config.steps,
    )


def training_rows(config: TrainConfig, documents: Documents):
    """(training rows, held-out rows or None): the documents split when evaluation is on
    (evaluation.py), then chunked to ``--seq-len`` or packed."""
    heldout = None
    if config.eval_every:
        documents, heldout = split_heldout(documents, config.eval_fraction)

    def rows(docs):
        return PackedDataset(docs, config.seq_len) if config.pack else docs.chunked(config.seq_len)

    return rows(documents), (rows(heldout) if heldout is not None else None)


def eval_loader(rows, topology: SPTopology, config: TrainConfig) -> SPDataLoader:
    """The held-out rows in order, by DP rank, no padding samples (a fresh position for every evaluation)."""
    return SPDataLoader(rows, topology, config.batch_size, shuffle=False, drop_last=True, seed=config.seed)
