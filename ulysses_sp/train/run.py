"""The training run behind launch/train.py: setup, the step loop, evaluation, checkpoints, metrics.

One optimizer step = ``grad_accum`` micro-batches per DP replica. All micro-batches of the step
are fetched first, so the loss of every micro-batch is normalised by the token count of the whole
global step (loss.py); the logged loss is the global token mean, equal to a non-SP run's on the
same global batch. A step whose micro-batches hold no labelled token at all (every row one token
long) is skipped and drawn again: it has nothing to learn from, and all ranks agree on it (the
count is summed over the world).

:func:`run` is the whole job: the flag checks before distributed init (validation.py), setup,
training, and on failure a report naming the rank that failed (failures.py) and a teardown that
does not wait on dead peers. Checkpoints: checkpoint.py; evaluation: evaluation.py.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import socket
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import transformers

from . import checkpoints as checkpoint
from ..core import comm
from ..memory.activation_checkpointing import enable_checkpointing
from ..data.loader import SPDataLoader
from .engines import NATIVE_TAG, DeepSpeedEngine, TorchEngine
from .evaluation import evaluate, split_heldout
from .failures import report_failure, shutdown
from ..integrations import accelerate as accelerate_integration
from ..integrations import deepspeed as ds_integration
from ..core.apply import apply
from ..loss.causal_lm import count_label_tokens, reduce_loss_for_logging
from ..data.packing import PackedDataset
from .presets import build_config
from ..memory.rms_norm import enable_rms_norm_recompute
from ..core.rng import sharded_rng, sync_rng
from ..core.sharding import to_device
from ..data.text import read_documents
from ..memory.tiled_mlp import tile_mlp
from ..core.topology import init_sp
from .validation import check_args, check_device_dtype, check_seq_len

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


def build_model(name: str, dtype: torch.dtype, device: torch.device, attn: str, config=None):
    """Random init from a preset or config.json; loads weights when the directory has them."""
    config = config if config is not None else build_config(name)
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


def run(args) -> None:
    """The whole job of launch/train.py. A failure on any rank ends every rank: a rank's own error is
    raised as it is (after leaving a note for the others), a collective that fails because another
    rank failed, died or stalled raises :class:`ulysses_sp.failures.CollectiveFailure` naming it."""
    check_args(args)  # before distributed init: every rank fails alike, none waits in a collective
    training = None
    failed = True
    try:
        training = TrainingRun.start(args)
        training.train()
        failed = False
    except BaseException as exc:
        replacement = report_failure(exc, training.where if training is not None else "setup",
                                     grace_s=min(5.0, args.timeout_s))
        if replacement is exc:
            raise
        raise replacement from exc
    finally:
        if training is not None:
            training.close_metrics()
        # the model, its engine and the topology's process groups sit in reference cycles: freed
        # here, while the interpreter is whole, rather than during its finalization, where freeing gloo
        # objects that hold tensors can abort a rank at exit after a successful run (troubleshooting.md)
        training = None
        gc.collect()
        shutdown(failed)


@dataclass(frozen=True)
class _Plan:
    device_type: str
    dtype: torch.dtype
    config: transformers.PretrainedConfig
    ds_config: dict
    sp_size: int
    zero_stage: int | None
    settings: dict
    resume: checkpoint.Checkpoint | None


def _preflight(args) -> _Plan:
    """Everything decided before distributed init: devices, model config, DeepSpeed config, SP size,
    the checkpoint to resume. Every rank has the same flags and files, so an error here is raised on
    every rank alike and none is left waiting in a collective."""
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = _DTYPES[args.dtype or ("bf16" if device_type == "cuda" else "fp32")]
    check_device_dtype(device_type, dtype)
    config = build_config(args.model)
    check_seq_len(config, args.seq_len, args.allow_longer_than_max_positions)
    if args.deepspeed is None:  # accelerate launch with distributed_type DEEPSPEED: its config file
        args.deepspeed = accelerate_integration.launched_deepspeed_config_file()
    ds_config = ds_integration.load_config(args.deepspeed)
    sp_size = accelerate_integration.resolve_sp_size(args.sp_size, ds_config)  # CLI, JSON, Accelerate config
    settings = checkpoint.run_settings(args, config)
    resume = checkpoint.find_checkpoint(args.resume) if args.resume else None
    if resume is not None:
        checkpoint.check_compatible(resume, settings, "deepspeed" if args.deepspeed else "torch")
    zero_stage = ds_integration.zero_stage(ds_config) if args.deepspeed else None
    return _Plan(device_type, dtype, config, ds_config, sp_size, zero_stage, settings, resume)


class TrainingRun:
    def __init__(self, args, topology, model, engine, loader, device, autocast, *, eval_rows=None,
                 start_step=0, settings=None, zero_stage=None):
        self.args, self.topology, self.model, self.engine = args, topology, model, engine
        self.loader, self.device, self.autocast = loader, device, autocast
        self.eval_rows, self.start_step, self.settings, self.zero_stage = eval_rows, start_step, settings, zero_stage
        self.where = "setup"
        self.rank0 = dist.get_rank() == 0
        self.metrics = None
        if args.metrics and self.rank0:
            os.makedirs(os.path.dirname(os.path.abspath(args.metrics)), exist_ok=True)
            self.metrics = open(args.metrics, "a")

    @classmethod
    def start(cls, args) -> "TrainingRun":
        plan = _preflight(args)
        device_type, dtype, ds_config, zero_stage, resume = (plan.device_type, plan.dtype, plan.ds_config,
                                                             plan.zero_stage, plan.resume)
        init_distributed(device_type, args.timeout_s)
        device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
        topology = init_sp(plan.sp_size)
        attn = args.attn or default_attention(device_type)
        torch.manual_seed(args.seed)  # identical initial weights on every rank
        # DeepSpeed keeps fp32 master weights itself; the torch engine trains fp32 weights under autocast
        model = build_model(args.model, dtype if args.deepspeed else torch.float32, device, attn, plan.config)
        enable_checkpointing(model, args.grad_ckpt, offload=args.offload_activations)  # "none": nothing
        if args.tiled_mlp:
            tile_mlp(model)
        if args.recompute_norms:
            enable_rms_norm_recompute(model)
        apply(model, topology, attn_implementation=attn)
        sync_rng(topology, args.seed)
        train_rows, eval_rows = _datasets(args)
        loader = SPDataLoader(train_rows, topology, args.batch_size, seed=args.seed,
                              check_identical=args.check_identical)
        if eval_rows is not None:
            try:
                _eval_loader(eval_rows, topology, args)
            except ValueError as e:
                raise ValueError(f"the held-out split (--eval-fraction {args.eval_fraction}) is too small: {e}") from None
        tag = None
        if resume is not None and args.deepspeed:
            tag = checkpoint.deepspeed_tag(resume, topology.world_size, zero_stage)
        if args.deepspeed:
            engine = DeepSpeedEngine(model, topology, ds_config, args, dtype,
                                     load_universal=tag not in (None, NATIVE_TAG))
        else:
            engine = TorchEngine(model, topology, lr=args.lr, weight_decay=args.weight_decay,
                                 max_grad_norm=args.max_grad_norm, warmup_steps=args.warmup_steps,
                                 total_steps=args.steps)
        comm.set_all_group_timeouts(timedelta(seconds=args.timeout_s))  # groups DeepSpeed made too
        start_step = 0
        if resume is not None:
            start_step = checkpoint.load(resume, engine=engine, loader=loader, topology=topology, seed=args.seed,
                                         deepspeed_tag=tag)
        autocast = nullcontext()
        if not args.deepspeed and dtype != torch.float32:
            autocast = torch.autocast(device_type, dtype=dtype)
        return cls(args, topology, model, engine, loader, device, autocast, eval_rows=eval_rows,
                   start_step=start_step, settings=plan.settings, zero_stage=zero_stage)

    def _batches(self):
        while True:
            yield from self.loader  # continues from the loader's position; an epoch's end starts the next

    def _step_batches(self, batches, step: int):
        """The step's micro-batches and their label count, skipping draws without a labelled token."""
        skipped = 0
        while True:
            micro = [to_device(next(batches), self.device) for _ in range(self.args.grad_accum)]
            num_items = count_label_tokens(micro, self.topology)  # summed over all ranks: all agree
            if float(num_items) > 0:
                return micro, num_items
            skipped += len(micro)
            if skipped >= len(self.loader):
                raise ValueError(f"{skipped} batches in a row (an epoch's worth) hold no labelled token: every row "
                                 f"is one token long; use documents of at least 2 tokens")
            if self.rank0:
                print(f"step {step}: the micro-batches hold no labelled token (one-token rows); drawing the next "
                      f"ones", flush=True)

    def train(self) -> None:
        args, topo = self.args, self.topology
        if self.start_step >= args.steps:
            if self.rank0:
                print(f"the checkpoint is at step {self.start_step} and --steps is {args.steps}: nothing to train",
                      flush=True)
            return
        batches = self._batches()
        progress = _progress(args.steps, self.start_step) if self.rank0 else None
        for step in range(self.start_step + 1, args.steps + 1):
            self.where = f"step {step}"
            micro, num_items = self._step_batches(batches, step)
            start = time.perf_counter()
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
            if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
                self.where = f"evaluation after step {step}"
                self._evaluate(step, progress)
            if args.save_dir and ((args.save_every and step % args.save_every == 0) or step == args.steps):
                self.where = f"saving step {step}"
                self._save(step)
        if progress is not None:
            progress.close()

    def _evaluate(self, step: int, progress) -> None:
        loader = _eval_loader(self.eval_rows, self.topology, self.args)
        result = evaluate(self.engine, loader, self.topology, device=self.device, autocast=self.autocast,
                          to_device=to_device, max_batches=self.args.eval_batches)
        if self.rank0:
            self._emit(result.record(step), None)
            line = f"step {step}: eval loss {result.loss:.4f}, perplexity {result.perplexity:.2f} ({result.tokens} tokens)"
            (progress.write if progress is not None else print)(line)

    def _save(self, step: int) -> None:
        path = checkpoint.save(self.args.save_dir, step, engine=self.engine, loader=self.loader,
                               topology=self.topology, settings=self.settings,
                               engine_name="deepspeed" if self.args.deepspeed else "torch", zero_stage=self.zero_stage)
        if self.rank0:
            print(f"step {step}: saved {path}", flush=True)

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

    def close_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None


def _datasets(args):
    """(training rows, held-out rows or None): documents split when evaluation is on (evaluation.py),
    then chunked to ``--seq-len`` or packed."""
    documents = read_documents(args.dataset)
    heldout = None
    if args.eval_every:
        documents, heldout = split_heldout(documents, args.eval_fraction)
    rows = lambda docs: PackedDataset(docs, args.seq_len) if args.pack else docs.chunked(args.seq_len)  # noqa: E731
    return rows(documents), (rows(heldout) if heldout is not None else None)


def _eval_loader(rows, topology, args) -> SPDataLoader:
    """The held-out rows in order, by DP rank, no padding samples (a fresh position for every evaluation)."""
    return SPDataLoader(rows, topology, args.batch_size, shuffle=False, drop_last=True, seed=args.seed)


def _progress(total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)
