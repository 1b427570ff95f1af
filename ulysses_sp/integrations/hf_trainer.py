"""SPTrainer: ``transformers.Trainer`` with Ulysses SP, for training and evaluation.

    trainer = SPTrainer(model=model, args=TrainingArguments(...), train_dataset=..., eval_dataset=...,
                        data_collator=collate, sp_size=2)   # sp_size: default the Accelerate config's

What changes against the stock Trainer (tested with transformers 5.25), and why the numbers stay its numbers.
P = sp_size, dp = world / P, N = labelled tokens of one optimizer step over every micro-batch and
DP replica (labels shifted, as the stock Trainer counts them).

* **Data**: the Trainer's loaders are prepared by Accelerate, which shards batches by *global*
  rank; they are re-keyed by DP rank (:func:`ulysses_sp.integrations.accelerate.key_loader_by_dp`),
  so the P ranks of an SP group read the same full batch. Each full batch is checked to be the same
  on the group (``check_identical``) and cut into this rank's shard (:func:`ulysses_sp.shard_batch`:
  padded to a multiple of P, labels shifted before slicing) where the Trainer fetches it.
* **Loss and gradient**: the stock Trainer with ``average_tokens_across_devices`` (its default)
  gives each of its dp ranks ``loss = dp * CE_rank / N`` and DDP averages over dp, so the gradient
  is that of ``sum(CE) / N``. Here ``num_items_in_batch = count_label_tokens(step) = N / dp`` and
  :func:`ulysses_sp.causal_lm_loss` returns ``dp * CE_group / N`` on each of the P ranks of a group;
  their gradients sum to ``P * dp * dCE_group / N`` and DDP averages over all dp*P ranks:
  ``(1 / (dp*P)) * sum_groups P * dp * dCE_group / N = d(sum CE) / N``, the stock gradient. The loss
  is already normalised for the whole step (``loss_is_scaled_for_ga = True``): no division by the
  accumulation steps. The logged loss (the Trainer averages it over all ranks) is
  ``sum(CE) / N`` for the same reason. Without ``average_tokens_across_devices`` each group
  normalises by its own count, as each stock rank does, and the same algebra holds.
* **Evaluation runs under SP** (no fallback to full sequences per rank: the memory that made
  training possible makes evaluation possible). The eval loss of a batch is the SP group's loss,
  computed like the training loss without gradients, and is gathered over the DP ranks only (the
  P copies of a group are one value), then truncated like ``gather_for_metrics``: eval_loss is the
  stock Trainer's. Logits are never materialised, so ``compute_metrics`` (and predictions from
  ``predict``) are not available: evaluate loss / perplexity (``exp(eval_loss)``).
* The engine wraps ``CausalLMLoss(model)`` for training, so the loss runs inside its forward:
  DDP (Accelerate prepares it), DeepSpeed ZeRO 0-3 (the Trainer's prepare hands it to
  ``deepspeed.initialize``; ZeRO-3 gathers the head around the loss) or FSDP2 (sharded here by
  ``shard_causal_lm``, trainer_engine.py says why not by Accelerate). Each averages the gradients
  over all dp*P ranks, so the algebra above holds for all three (docs/loss.md).
  ``self.model`` stays the transformers model for saving and evaluation.

Supported: DDP (Accelerate's MULTI_GPU / MULTI_CPU), a single process, Accelerate's DeepSpeed
plugin and FSDP2. Refused with a ValueError: DeepSpeed and FSDP together, FSDP settings SP's
sharding cannot honour (trainer_engine.py), an SP/CP/TP ``parallelism_config`` (which would route
the Trainer through DeepSpeed's ALST), ``model_init``, ``compute_loss_func``, ``compute_metrics``,
``preprocess_logits_for_metrics``, label smoothing, several GPUs per process (DataParallel) and the
rank-aware ``batch_rebalance`` sampler.
"""

from __future__ import annotations

import functools
import os

import torch
from transformers import Trainer
from transformers.trainer import SCHEDULER_NAME
from transformers.trainer_utils import seed_worker

from ..core import comm
from ..core.apply import apply
from ..core.log import logger
from ..core.rng import sharded_rng
from ..core.sharding import shard_batch
from ..core.topology import init_sp
from ..data.identical import assert_same_across_sp
from ..loss.causal_lm import CausalLMLoss, HeadLoss, causal_lm_loss, count_label_tokens
from ..loss.tiled_ce import IGNORE_INDEX
from .accelerate import check_accelerator, ensure_process_group, key_loader_by_dp
from .deepspeed import gather_head_for_loss
from .fsdp2 import FSDP2_CHECKPOINT_DIR, shard_causal_lm
from .sp_size import claim_deepspeed_sp_keys, resolve_ring_size, resolve_sp_size
from .trainer_engine import engine_name, fsdp_refusals, fsdp_request


class SPTrainer(Trainer):
    """``transformers.Trainer`` that trains and evaluates a causal LM with Ulysses SP.

    ``sp_size``: SP group size (default: the DeepSpeed JSON's ``"sequence_parallel_size"`` in
    ``TrainingArguments(deepspeed=...)``, else the Accelerate config's ``parallelism_config_sp_size``
    with ``parallelism_config_sp_backend: ulysses_sp``, else 1). ``ring_size``: hybrid SP, ring
    attention across ``ring_size`` groups of ``sp_size / ring_size`` Ulysses ranks (an integer or
    ``"auto"``; default the JSON's ``"sequence_parallel_ring_size"``, else the Accelerate config's
    ``parallelism_config_cp_size``, else 1; docs/scaling.md). Given in two places, they must agree.
    ``attn_implementation``: the core kernel run over the full sequence (default: the model's).
    ``check_identical``: compare a checksum of every batch over the SP group (one tiny gather per
    batch). ``pad_token_id``: the id that pads sequences to a multiple of ``sp_size`` (never a
    target). ``head_loss``: the module
    the LM head and the cross-entropy run in, for training and evaluation (default a
    :class:`~ulysses_sp.loss.causal_lm.HeadLoss`; a subclass may also record per-token statistics).
    Everything else is the Trainer's. The data collator must give full batches with ``labels`` (or
    ``shift_labels``). A subclass refuses its own settings by extending :meth:`sp_refusals`.
    """

    loss_is_scaled_for_ga = True  # normalised by the whole step's token count (num_items_in_batch)

    def __init__(
        self,
        *args,
        sp_size: int | None = None,
        ring_size: int | str | None = None,
        attn_implementation: str | None = None,
        check_identical: bool = True,
        pad_token_id: int = 0,
        head_loss: HeadLoss | None = None,
        **kwargs,
    ):
        # before Trainer creates its Accelerator, which must not see our SP size (no ALST, no rejected
        # backend), nor its DeepSpeed engine (the SP keys of TrainingArguments' JSON are taken out)
        training_args = kwargs["args"] if "args" in kwargs else args[1] if len(args) > 1 else None
        ds_json = getattr(getattr(training_args, "hf_deepspeed_config", None), "config", None)
        ds_sp = claim_deepspeed_sp_keys(ds_json)
        size = resolve_sp_size(sp_size, ds_sp, explicit_source=f"SPTrainer(sp_size={sp_size})")
        super().__init__(*args, **kwargs)
        # after: the model exists (SFTTrainer may load it by name) for ring_size="auto" to read its heads
        ring = resolve_ring_size(ring_size, size, self.model, ds_sp, explicit_source="SPTrainer(ring_size={})")
        self.sp_fsdp = fsdp_request(self)
        found = [what for what, bad in self.sp_refusals().items() if bad]
        if found:
            raise ValueError(f"{type(self).__name__} does not support: {'; '.join(found)}")
        check_accelerator(self.accelerator, allow_fsdp=self.sp_fsdp is not None)
        ensure_process_group()
        self.sp_topology = init_sp(size, ring)
        self.sp_engine = engine_name(self, self.sp_fsdp)
        self.sp_check_identical = check_identical
        self.sp_pad_token_id = pad_token_id
        self.sp_head_loss = head_loss if head_loss is not None else HeadLoss()
        self.sp_loss_root: torch.nn.Module | None = None  # the engine-wrapped CausalLMLoss, once training starts
        logger.info("SPTrainer: %s, engine %s", self.sp_topology, self.sp_engine)
        apply(self.model, self.sp_topology, attn_implementation=attn_implementation)

    def sp_refusals(self) -> dict[str, bool]:
        """Every option SPTrainer cannot honour (module docstring) -> whether it is set; the
        constructor raises one ValueError listing those set. A subclass adds its own."""
        args = self.args
        refused = {
            "DeepSpeed and FSDP together (two engines; keep one)": self.is_deepspeed_enabled
            and self.sp_fsdp is not None,
            **fsdp_refusals(self.sp_fsdp),
            "model_init (the model must exist to be wrapped)": self.model_init is not None,
            "compute_loss_func (SPTrainer computes the sharded loss)": self.compute_loss_func is not None,
            "compute_metrics (logits are never materialised under SP; evaluate the loss)": self.compute_metrics
            is not None,
            "preprocess_logits_for_metrics": self.preprocess_logits_for_metrics is not None,
            f"label_smoothing_factor={args.label_smoothing_factor}": args.label_smoothing_factor != 0,
            f"{args.n_gpu} GPUs per process (DataParallel); launch one process per GPU": args.n_gpu > 1,
            "train_sampling_strategy='batch_rebalance' (rank-aware by global rank)": args.train_sampling_strategy
            == "batch_rebalance",
            "include_for_metrics with 'inputs'": "inputs" in (args.include_for_metrics or []),
        }
        pc = getattr(self.accelerator, "parallelism_config", None)
        if pc is not None:
            sizes = {"sp_size": pc.sp_size, "cp_size": pc.cp_size, "tp_size": pc.tp_size}
            for name, size in sizes.items():
                refused[f"parallelism_config {name}={size} (sp_size > 1 is DeepSpeed's ALST)"] = size > 1
        return refused

    # --- data -------------------------------------------------------------------------------------

    def _get_dataloader(self, *args, **kwargs):
        """The Trainer's loader, keyed by DP rank: the SP group reads identical full batches."""
        loader = key_loader_by_dp(super()._get_dataloader(*args, **kwargs), self.sp_topology)
        init = getattr(loader, "worker_init_fn", None)
        if isinstance(init, functools.partial) and init.func is seed_worker:  # seeded by global rank
            keywords = {**init.keywords, "rank": self.sp_topology.dp_rank}
            loader.worker_init_fn = functools.partial(seed_worker, **keywords)
        return loader

    def _shard(self, batch: dict) -> dict:
        if self.sp_check_identical:
            assert_same_across_sp(batch, self.sp_topology, "a Trainer batch")
        return shard_batch(batch, self.sp_topology, pad_token_id=self.sp_pad_token_id, ignore_index=IGNORE_INDEX)

    def _num_items(self, local_batches: list[dict]) -> torch.Tensor:
        """num_items_in_batch for our loss (see the module docstring)."""
        topo = self.sp_topology
        if self.args.average_tokens_across_devices:
            return count_label_tokens(local_batches, topo)
        count = torch.stack([(b["shift_labels"] != IGNORE_INDEX).sum() for b in local_batches]).sum()
        return (comm.all_reduce(count, topo.sp_group) if topo.sp_size > 1 else count).to(torch.float64)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Fetch the step's full batches, shard them, count the step's labelled tokens."""
        local = []
        for _ in range(num_batches):
            try:
                local.append(self._shard(next(epoch_iterator)))
            except StopIteration:
                break
        return local, (self._num_items(local) if local else None)

    def get_total_train_batch_size(self, args) -> int:
        """Sequences per optimizer step: micro-batch x accumulation x dp (the SP ranks share them)."""
        return self._train_batch_size * args.gradient_accumulation_steps * self.sp_topology.dp_size

    # --- training ---------------------------------------------------------------------------------

    def _wrap_model(self, model, training: bool = True, dataloader=None):
        """For training, the engine wraps ``CausalLMLoss(model)``, so the loss runs inside its forward:
        DDP's reducer sees it, ZeRO-3 gathers the head around the loss only, FSDP2's root holds it."""
        if not training or self.accelerator.unwrap_model(model, keep_torch_compile=False) is not model:
            return super()._wrap_model(model, training=training, dataloader=dataloader)
        if self.sp_engine == "fsdp2":
            self.sp_loss_root = shard_causal_lm(
                model,
                self.sp_topology,
                reshard_after_forward=self.sp_fsdp.reshard_after_forward,
                param_dtype=torch.bfloat16 if self.args.bf16 else None,
                head_loss=self.sp_head_loss,
            )
            self.optimizer = None  # the Trainer made it over the full weights: make it over the DTensor shards
            self.create_optimizer()
            return self.sp_loss_root  # not self.model: the Trainer prepares only the optimizer
        wrapper = CausalLMLoss(model, self.sp_topology)
        wrapper.head_loss = self.sp_head_loss  # the trainer's, so a subclass's statistics land in one place
        if self.sp_engine == "deepspeed":
            # handed back as self.model, so that the Trainer's prepare(self.model, optimizer, ...) gives
            # it to deepspeed.initialize; _prepare_for_training puts the transformers model back
            self.model = wrapper
            return wrapper
        self.sp_loss_root = self.accelerator.prepare_model(wrapper)
        return self.sp_loss_root

    def _prepare_for_training(self, *args, **kwargs):
        """The Trainer's, with ``self.model`` kept the transformers model (saving, evaluation), which
        the Trainer points at the FSDP wrapper and _wrap_model at the loss module for DeepSpeed."""
        model = self.model
        try:
            prepared = super()._prepare_for_training(*args, **kwargs)
        finally:
            self.model = model
        if self.sp_engine == "deepspeed":
            self.sp_loss_root = self.model_wrapped
            if self.accelerator.state.deepspeed_plugin.zero_stage == 3:
                gather_head_for_loss(self.accelerator.unwrap_model(self.sp_loss_root))
        return prepared

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """``causal_lm_loss`` of the local shard / ``num_items_in_batch`` (see the module docstring)."""
        if return_outputs:
            raise ValueError(
                "SPTrainer computes the loss without materialising logits; return_outputs=True is not available"
            )
        inner = self.accelerator.unwrap_model(model)
        with sharded_rng(self.sp_topology):
            if isinstance(inner, CausalLMLoss):
                return model(inputs, num_items_in_batch)
            return causal_lm_loss(inner, inputs, self.sp_topology, num_items_in_batch, head_loss=self.sp_head_loss)

    # --- saving -----------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Under FSDP2 every rank takes part in gathering the full weights, which rank 0 writes as the
        stock Trainer does (``model.safetensors``); the other engines save as the Trainer does."""
        if self.sp_engine != "fsdp2" or self.sp_loss_root is None:
            return super().save_model(output_dir, _internal_call)
        state = comm.full_model_state(self.model)  # collective; rank 0 holds it
        if self.args.should_save:
            self._save(output_dir or self.args.output_dir, state_dict=state)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None):
        if state_dict is not None and self.sp_engine == "deepspeed" and self.sp_loss_root is not None:
            # DeepSpeed's engine holds the CausalLMLoss: its state dict is the model's under "model."
            state_dict = {k.removeprefix("model."): v for k, v in state_dict.items()}
        return super()._save(output_dir, state_dict)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Under FSDP2: weights and AdamW state by torch.distributed.checkpoint in ``fsdp2/`` (every
        rank its shards; any world size reads them back), the LR schedule as the Trainer writes it."""
        if self.sp_engine != "fsdp2":
            return super()._save_optimizer_and_scheduler(output_dir)
        comm.save_sharded(self._sharded_state(), os.path.join(output_dir, FSDP2_CHECKPOINT_DIR))
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if self.sp_engine != "fsdp2" or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, FSDP2_CHECKPOINT_DIR)
        if not os.path.isdir(path):
            raise ValueError(
                f"{checkpoint} has no {FSDP2_CHECKPOINT_DIR}/ (the sharded weights and optimizer state SPTrainer "
                "writes under FSDP2): resume it with the engine that saved it"
            )
        state = self._sharded_state()
        comm.load_sharded(state, path)
        comm.load_sharded_state(self.sp_loss_root, self._torch_optimizer(), state)
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self.sp_engine == "fsdp2" and self.sp_loss_root is not None:
            return  # already sharded: the weights come back with the optimizer state, from fsdp2/
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _torch_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)  # inside Accelerate's wrapper

    def _sharded_state(self) -> dict:
        return comm.sharded_state(self.sp_loss_root, self._torch_optimizer())

    # --- evaluation -------------------------------------------------------------------------------

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The SP group's loss of one eval batch, normalised like the stock Trainer's; no logits."""
        has_labels = inputs.get("labels") is not None or inputs.get("shift_labels") is not None
        local = self._shard(inputs)
        if not has_labels:
            return None, None, None
        num_items = self._num_items([local])
        with torch.no_grad(), self.accelerator.autocast():
            if self.sp_engine != "ddp" and self.sp_loss_root is not None:
                # through the engine: FSDP2's root gathers the final norm, ZeRO-3's hooks the head
                loss = self.sp_loss_root(local, num_items)
            else:
                loss = causal_lm_loss(self.model, local, self.sp_topology, num_items, head_loss=self.sp_head_loss)
        return loss.detach(), None, None

    def evaluation_loop(self, *args, **kwargs):
        self.gather_function = self._gather_over_dp  # the Trainer resets it at the end of the loop
        output = super().evaluation_loop(*args, **kwargs)
        if self.sp_engine == "fsdp2" and self.sp_loss_root is not None:
            self.sp_loss_root.reshard()  # the root unit stays gathered after a forward no backward follows
        return output

    def _gather_over_dp(self, tensor: torch.Tensor) -> torch.Tensor:
        """``gather_for_metrics`` over one rank per SP group: what a non-SP run over dp ranks gathers."""
        topo = self.sp_topology
        gathered = self.accelerator.gather(tensor)  # [world * n], in global rank order
        if topo.sp_size > 1:
            gathered = gathered.reshape(topo.dp_size, topo.sp_size, -1)[:, 0].reshape(-1, *tensor.shape[1:])
        state = self.accelerator.gradient_state
        if state.end_of_dataloader and state.remainder > 0:
            gathered = gathered[: state.remainder]  # the samples Accelerate repeated to even the batches
        return gathered
