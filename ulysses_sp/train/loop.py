"""The run loop: setup from the plan, the optimizer steps, evaluation, checkpoints and metrics.

One optimizer step = ``grad_accum`` micro-batches per DP replica. All micro-batches of the step are
fetched first, so the loss of every micro-batch is normalised by the token count of the whole global
step (loss/step.py); the logged loss is the global token mean, equal to a non-SP run's on the same
global batch. A step whose micro-batches hold no labelled token at all (every row one token long) is
skipped and drawn again: it has nothing to learn from, and all ranks agree on it (the count is
summed over the world).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from datetime import timedelta

import torch

from ..core import comm
from ..core.apply import apply
from ..core.log import logger
from ..core.rng import sync_rng
from ..core.sequence_info import SEQ_INFO_KWARG
from ..core.sharding import to_device
from ..core.topology import init_sp
from ..data.loader import SPDataLoader
from ..loss.causal_lm import count_label_tokens, planned_loss_path
from ..loss.step import accumulate_step
from ..memory.activation_checkpointing import enable_checkpointing
from ..memory.compile import compile_layers
from ..memory.fused_ops import fuse_elementwise
from ..memory.rms_norm import enable_rms_norm_recompute
from ..memory.tiled_mlp import tile_mlp
from . import checkpoints, flops
from .build import build_engine, build_model, eval_loader, init_distributed, training_rows
from .engines import NATIVE_TAG
from .evaluation import evaluate
from .memory_plan import memory_features
from .metrics import MetricsFile, Throughput, peak_memory_gb, progress_bar
from .plan import RunPlan


class TrainingRun:
    """One run's state: plan, topology, model, engine, data and where it is (``where``, for failure reports)."""

    def __init__(
        self,
        plan: RunPlan,
        topology,
        model,
        engine,
        loader: SPDataLoader,
        device: torch.device,
        *,
        eval_rows=None,
        start_step: int = 0,
        predicted_peak: int | None = None,
    ):
        self.plan, self.config = plan, plan.config
        self.predicted_peak = predicted_peak  # bytes, from --memory auto
        self.topology, self.model, self.engine, self.loader, self.device = topology, model, engine, loader, device
        self.eval_rows, self.start_step = eval_rows, start_step
        self.autocast = nullcontext()
        if plan.engine_name == "torch" and plan.dtype != torch.float32:  # fp32 weights trained under autocast
            self.autocast = torch.autocast(plan.device_type, dtype=plan.dtype)
        self.where = "setup"
        self.skipped_draws = 0  # draws of micro-batches without a labelled token, over the run
        self.rank0 = comm.rank() == 0
        self.metrics = MetricsFile(self.config.metrics, comm.rank())
        self.shape = flops.shape_of(model)
        half = plan.dtype in (torch.bfloat16, torch.float16)
        self.peak_flops = (
            flops.gpu_peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" and half else None
        )  # MFU against the half-precision peak: reported for bf16/fp16 runs on known GPUs only
        self.throughput = Throughput()

    @classmethod
    def start(cls, plan: RunPlan) -> TrainingRun:
        """Join the job, build everything the plan says, resume when asked."""
        config = plan.config
        init_distributed(plan.device_type, config.timeout_s)
        device = (
            torch.device("cuda", torch.cuda.current_device()) if plan.device_type == "cuda" else torch.device("cpu")
        )
        topology = init_sp(plan.sp_size, plan.ring_size)
        if plan.ring_size > 1:
            logger.info("hybrid SP: %d Ulysses x %d ring ranks", topology.ulysses_size, plan.ring_size)
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        # DeepSpeed keeps fp32 master weights itself; the torch engine trains fp32 weights under autocast,
        # the FSDP2 engine fp32 shards with its mixed-precision policy
        weights_dtype = plan.dtype if plan.engine_name == "deepspeed" else torch.float32
        model = build_model(config.model, weights_dtype, device, plan.attention, plan.model_config)
        features, predicted = memory_features(plan, model, topology, device)
        if predicted is not None:
            logger.info("--memory auto: %s, predicted peak %.1f GiB", features.flags(), predicted / 2**30)
        enable_checkpointing(model, features.grad_ckpt, offload=features.offload_activations)  # "none": nothing
        if config.liger_ops:  # before the tiled MLP and the norm recompute, which keep the fused forwards
            fuse_elementwise(model)
        if features.tiled_mlp:
            tile_mlp(model)
        if features.recompute_norms:
            enable_rms_norm_recompute(model)
        apply(model, topology, attn_implementation=plan.attention, head_chunks=features.head_chunks)
        if config.compile:
            compile_layers(model, backend=config.compile)
        sync_rng(topology, config.seed)
        train_rows, eval_rows = training_rows(config, plan.documents)
        loader = SPDataLoader(
            train_rows, topology, config.batch_size, seed=config.seed, check_identical=config.check_identical
        )
        if eval_rows is not None:
            try:
                eval_loader(eval_rows, topology, config)
            except ValueError as e:
                raise ValueError(
                    f"the held-out split (--eval-fraction {config.eval_fraction}) is too small: {e}"
                ) from None
        tag = None
        if plan.resume is not None and plan.engine_name == "deepspeed":
            tag = checkpoints.deepspeed_tag(plan.resume, topology.world_size, plan.zero_stage)
        engine = build_engine(plan, model, topology, load_universal=tag not in (None, NATIVE_TAG))
        comm.set_all_group_timeouts(timedelta(seconds=config.timeout_s))  # groups DeepSpeed made too
        start_step = 0
        if plan.resume is not None:
            start_step = checkpoints.load(
                plan.resume, engine=engine, loader=loader, topology=topology, seed=config.seed, deepspeed_tag=tag
            )
        return cls(
            plan,
            topology,
            model,
            engine,
            loader,
            device,
            eval_rows=eval_rows,
            start_step=start_step,
            predicted_peak=predicted,
        )

    def _batches(self):
        while True:
            yield from self.loader  # continues from the loader's position; an epoch's end starts the next

    def _step_batches(self, batches, step: int):
        """The step's micro-batches and their label count, skipping draws without a labelled token."""
        skipped = 0
        while True:
            micro = [to_device(next(batches), self.device) for _ in range(self.config.grad_accum)]
            num_items = count_label_tokens(micro, self.topology)  # summed over all ranks: all agree
            if float(num_items) > 0:
                return micro, num_items
            skipped += len(micro)
            if skipped >= len(self.loader):
                raise ValueError(
                    f"{skipped} batches in a row (an epoch's worth) hold no labelled token: every row "
                    f"is one token long; use documents of at least 2 tokens"
                )
            self.skipped_draws += 1
            if self.skipped_draws in (1, 10, 100) or self.skipped_draws % 1000 == 0:  # not once per draw
                logger.info(
                    "step %d: the micro-batches hold no labelled token (one-token rows); drawing the next "
                    "ones (%d draws skipped so far)",
                    step,
                    self.skipped_draws,
                )

    def train(self) -> None:
        config, topo = self.config, self.topology
        if self.start_step >= config.steps:
            logger.info(
                "the checkpoint is at step %d and --steps is %d: nothing to train", self.start_step, config.steps
            )
            return
        batches = self._batches()
        progress = progress_bar(config.steps, self.start_step) if self.rank0 else None

        def forward_backward(local_batch, num_items, last: bool) -> torch.Tensor:
            with self.autocast:
                return self.engine.forward_backward(local_batch, num_items)

        for step in range(self.start_step + 1, config.steps + 1):
            self.where = f"step {step}"
            micro, num_items = self._step_batches(batches, step)
            start = time.perf_counter()
            loss = accumulate_step(micro, topo, forward_backward, num_items)  # global token mean of the step
            grad_norm = self.engine.step()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            record = self._record(step, micro, loss, grad_norm, elapsed)
            self.metrics.write(record)
            if progress is not None:
                progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{self.throughput.recent_tok_per_s:.0f}")
                progress.update(1)
            if config.eval_every and (step % config.eval_every == 0 or step == config.steps):
                self.where = f"evaluation after step {step}"
                self._evaluate(step)
            if config.save_dir and ((config.save_every and step % config.save_every == 0) or step == config.steps):
                self.where = f"saving step {step}"
                self._save(step)
        if progress is not None:
            progress.close()
        self._summary(record)

    def _summary(self, last: dict) -> None:
        """One block at the end: what was trained, how fast, the memory, the loss, where the outputs are."""
        t, world = self.throughput, self.topology.world_size
        peak_gb = float(comm.all_reduce(torch.tensor(peak_memory_gb(self.device), device=self.device), None, "max"))
        rate, flop_rate = t.median_rates()
        unit = "GPU" if self.device.type == "cuda" else "rank"
        mfu = "" if self.peak_flops is None else f", MFU {flop_rate / (world * self.peak_flops):.1%}"
        lines = [
            f"done: {t.steps} steps (to step {last['step']}), {t.tokens} tokens in {t.seconds:.1f} s of steps",
            f"  median step: {rate:.0f} tok/s, {rate / world:.0f} tok/s per {unit}{mfu}",
            f"  peak memory {peak_gb:.2f} GiB (the largest of {world} ranks), final loss {last['loss']:.4f}",
        ]
        if self.predicted_peak is not None:
            lines.append(f"  --memory auto predicted a peak of {self.predicted_peak / 2**30:.2f} GiB")
        if self.config.metrics:
            lines.append(f"  metrics: {self.config.metrics}")
        if self.config.save_dir:
            lines.append(f"  checkpoints: {self.config.save_dir}")
        logger.info("\n".join(lines))

    def _evaluate(self, step: int) -> None:
        loader = eval_loader(self.eval_rows, self.topology, self.config)
        result = evaluate(
            self.engine,
            loader,
            self.topology,
            device=self.device,
            autocast=self.autocast,
            max_batches=self.config.eval_batches,
        )
        self.metrics.write(result.record(step))
        logger.info(
            "step %d: eval loss %.4f, perplexity %.2f (%d tokens)", step, result.loss, result.perplexity, result.tokens
        )

    def _save(self, step: int) -> None:
        path = checkpoints.save(
            self.config.save_dir,
            step,
            engine=self.engine,
            loader=self.loader,
            topology=self.topology,
            settings=self.plan.settings,
            engine_name=self.plan.engine_name,
            zero_stage=self.plan.zero_stage,
        )
        logger.info("step %d: saved %s", step, path)

    def _record(self, step: int, micro, loss: torch.Tensor, grad_norm, elapsed: float) -> dict:
        topo = self.topology
        local = torch.zeros(2, dtype=torch.float64)  # [tokens, model FLOPs] of this rank's share of the step
        for mb in micro:
            B, s = mb["input_ids"].shape[:2]
            info = mb.get(SEQ_INFO_KWARG)
            local[0] += B * s
            if info is not None and info.cu_seqlens is not None:  # attention within documents only
                group = flops.document_step_flops(self.shape, B * s * topo.sp_size, info.cu_seqlens.diff())
            else:
                group = flops.step_flops(self.shape, s * topo.sp_size, B)
            local[1] += group / topo.sp_size  # each SP rank counts 1/P of its group's sequences
        tokens, step_flops = comm.all_reduce(local.to(self.device), None).tolist()
        tokens = int(tokens)
        self.throughput.add(tokens, elapsed, step_flops)
        extra = (
            {} if self.peak_flops is None else {"mfu": flops.mfu(step_flops, elapsed, topo.world_size, self.peak_flops)}
        )
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
            "loss_path": planned_loss_path(self.model, B * s, self.device),  # the last micro-batch's
            **extra,
        }

    def close(self) -> None:
        self.metrics.close()
