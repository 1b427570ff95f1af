"""The training run behind launch/train.py: setup, the step loop, metrics.

One optimizer step = ``grad_accum`` micro-batches per DP replica. All micro-batches of the step
are fetched first, so the loss of every micro-batch is normalised by the token count of the whole
global step (loss.py); the logged loss is the global token mean, equal to a non-SP run's on the
same global batch.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import time
from contextlib import nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist
import transformers

from . import comm
from .checkpointing import enable_checkpointing
from .data import SPDataLoader, load_text_dataset
from .engine import DeepSpeedEngine, TorchEngine
from .integrations import accelerate as accelerate_integration
from .integrations import deepspeed as ds_integration
from .integrations.hf import apply
from .loss import count_label_tokens, reduce_loss_for_logging
from .presets import build_config
from .rng import sharded_rng, sync_rng
from .sharding import to_device
from .tiled_mlp import tile_mlp
from .topology import init_sp

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def init_distributed(device: str, timeout_s: float) -> None:
    """Join the job torchrun/deepspeed/accelerate started, or a world of one when run directly."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    kwargs = dict(timeout=timedelta(seconds=timeout_s))
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local), **kwargs)
    else:
        if "OMP_NUM_THREADS" not in os.environ:  # the deepspeed launcher leaves every rank all cores
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        dist.init_process_group("gloo", **kwargs)


def default_attention(device: str) -> str:
    if device == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def build_model(name: str, dtype: torch.dtype, device: torch.device, attn: str):
    """Random init from a preset or config.json; loads weights when the directory has them."""
    config = build_config(name)
    config._attn_implementation = "sdpa" if attn.startswith("flash") else attn  # set ours in apply()
    has_weights = os.path.isdir(name) and any(
        f.endswith((".safetensors", ".bin")) for f in os.listdir(name))
    if has_weights:
        model = transformers.AutoModelForCausalLM.from_pretrained(name, config=config, dtype=dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.to(device).train()


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


class TrainingRun:
    def __init__(self, args, topology, model, engine, loader, device, autocast):
        self.args, self.topology, self.model, self.engine = args, topology, model, engine
        self.loader, self.device, self.autocast = loader, device, autocast
        self.rank0 = dist.get_rank() == 0
        self.metrics = open(args.metrics, "a") if (args.metrics and self.rank0) else None

    @classmethod
    def start(cls, args) -> "TrainingRun":
        device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device_type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was given but no CUDA device is visible; use --device cpu")
        dtype = _DTYPES[args.dtype or ("bf16" if device_type == "cuda" else "fp32")]
        if device_type == "cpu" and dtype == torch.float16:
            raise ValueError("--dtype fp16 is not supported on CPU; use fp32 or bf16")
        if args.deepspeed is None:  # accelerate launch with distributed_type DEEPSPEED: its config file
            args.deepspeed = accelerate_integration.launched_deepspeed_config_file()
        ds_config = ds_integration.load_config(args.deepspeed)
        sp_size = accelerate_integration.resolve_sp_size(args.sp_size, ds_config)  # CLI, JSON, Accelerate config
        init_distributed(device_type, args.timeout_s)
        device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
        topology = init_sp(sp_size)
        attn = args.attn or default_attention(device_type)
        torch.manual_seed(args.seed)  # identical initial weights on every rank
        # DeepSpeed keeps fp32 master weights itself; the torch engine trains fp32 weights under autocast
        model = build_model(args.model, dtype if args.deepspeed else torch.float32, device, attn)
        enable_checkpointing(model, args.grad_ckpt, offload=args.offload_activations)  # "none": nothing
        if args.tiled_mlp:
            tile_mlp(model)
        apply(model, topology, attn_implementation=attn)
        sync_rng(topology, args.seed)
        dataset = load_text_dataset(args.dataset, args.seq_len, pack=args.pack)
        loader = SPDataLoader(dataset, topology, args.batch_size, seed=args.seed,
                              check_identical=args.check_identical)
        if args.deepspeed:
            engine = DeepSpeedEngine(model, topology, ds_config, args, dtype)
        else:
            engine = TorchEngine(model, topology, lr=args.lr, weight_decay=args.weight_decay,
                                 max_grad_norm=args.max_grad_norm, warmup_steps=args.warmup_steps,
                                 total_steps=args.steps)
        autocast = nullcontext()
        if not args.deepspeed and dtype != torch.float32:
            autocast = torch.autocast(device_type, dtype=dtype)
        return cls(args, topology, model, engine, loader, device, autocast)

    def _batches(self):
        epoch = 0
        while True:
            self.loader.set_epoch(epoch)
            yield from self.loader
            epoch += 1

    def train(self) -> None:
        args, topo = self.args, self.topology
        batches = self._batches()
        progress = _progress(args.steps) if self.rank0 else None
        for step in range(1, args.steps + 1):
            micro = [to_device(next(batches), self.device) for _ in range(args.grad_accum)]
            start = time.perf_counter()
            num_items = count_label_tokens(micro, topo)
            losses = []
            for mb in micro:
                with self.autocast, sharded_rng(topo):
                    losses.append(self.engine.forward_backward(mb, num_items))
            grad_norm = self.engine.step()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            record = self._record(step, micro, losses, grad_norm, elapsed)
            if self.rank0:
                self._emit(record, progress)
        if progress is not None:
            progress.close()

    def _record(self, step, micro, losses, grad_norm, elapsed) -> dict:
        topo = self.topology
        loss = reduce_loss_for_logging(losses, topo)  # global token mean of the step
        local_tokens = sum(int(mb["input_ids"].numel()) for mb in micro)
        tokens = int(comm.all_reduce(torch.tensor(float(local_tokens), device=self.device), None))
        return {
            "step": step,
            "loss": float(loss),
            "tokens": tokens,
            "tok_per_s": tokens / elapsed,
            "tok_per_s_per_gpu": tokens / elapsed / topo.world_size,
            "peak_mem_gb": round(peak_memory_gb(self.device), 3),
            "lr": self.engine.lr,
            "grad_norm": grad_norm,
            "step_time_s": elapsed,
        }

    def _emit(self, record: dict, progress) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
        if progress is not None:
            progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tok_per_s']:.0f}")
            progress.update(1)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="train", dynamic_ncols=True)
