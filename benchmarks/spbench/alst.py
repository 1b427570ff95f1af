"""The DeepSpeed ALST side, wired the way ArcticTraining's SFT trainer wires it (sequence parallel
branch, non-liger loss):

* ``UlyssesSPAttentionHF.register_with_transformers(model, core_attn_implementation=attn, ...)``
  once per process. It initialises DeepSpeed's module-global SP groups (asserting if called
  twice) and overwrites ``ALL_ATTENTION_FUNCTIONS[attn]`` process-wide; every ALST model is built
  with ``attn`` so it goes through that wrapper (our models use a private name, unaffected).
* ``deepspeed.initialize(model=model, mpu=parallel_state_sp)``; the batch is sharded by
  ``UlyssesSPDataLoaderAdapter`` over a DataLoader of the full batch (position_ids, shifted labels).
* Loss: backbone on the shard, ``TiledFusedLogitsLoss`` over ~1 GiB fp32-logit shards with the
  model's own ``loss_function`` (weighted by the shard's labelled tokens), then the differentiable
  weighted all-gather average over the SP group; ``engine.backward(loss)``; ``engine.step()``.
* Levers: ``tiled_mlp`` replaces the forward of this model's MLP instances (not the class, so our
  models are untouched) with ``TiledMLP`` over ceil(s / hidden) shards, agreed across ranks, as
  ArcticTraining does; ``ac_offload`` runs forward + backward inside DeepSpeed's
  ``CheckpointHiddenStatesOffload`` (checkpointed layer inputs go to pinned CPU memory). On a CPU
  device that context offloads nothing (DeepSpeed skips CPU tensors); the run still goes through it.
"""

from __future__ import annotations

import contextlib
import math
import types

import deepspeed
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from ulysses_sp.integrations.deepspeed import destroy

from . import levers as lv
from .workload import Workload


class AlstSide:
    name = "alst"

    def __init__(self, workload: Workload):
        self.workload = workload
        self.mpu = None  # deepspeed.runtime.sequence_parallel.parallel_state_sp after registration

    def register(self, model) -> None:
        """Register ALST's wrapper once per process (DeepSpeed's SP groups are module-global)."""
        if self.mpu is not None:
            return
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

        self.mpu = UlyssesSPAttentionHF.register_with_transformers(
            model_name_or_path=model,
            core_attn_implementation=self.workload.attn,
            sequence_parallel_size=self.workload.sp,
            micro_batch_size=self.workload.batch_size,
            seq_length_is_variable=True,
        )

    def prepare(self, levers: frozenset[str], seq_len: int) -> AlstRun:
        return AlstRun(self, levers, seq_len)


class AlstRun:
    def __init__(self, side: AlstSide, levers: frozenset[str], seq_len: int):
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter

        wl = side.workload
        self.levers = levers
        self.model = wl.build_model(wl.attn)
        side.register(self.model)
        mpu = side.mpu
        self.sp_group, self.sp_size = mpu.get_sequence_parallel_group(), mpu.get_sequence_parallel_world_size()
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if "tiled_mlp" in levers:
            for layer in self.model.model.layers:
                layer.mlp.forward = types.MethodType(_tiled_mlp_forward, layer.mlp)
        self.offload = None
        if "ac_offload" in levers:
            from deepspeed.runtime.activation_checkpointing.offload_activations import (
                get_checkpoint_hidden_states_offloading_ctx_manager,
            )

            self.offload = get_checkpoint_hidden_states_offloading_ctx_manager()
        self.engine, *_ = deepspeed.initialize(
            model=self.model, model_parameters=list(self.model.parameters()), config=wl.ds_config(), mpu=mpu
        )
        full = wl.full_batch(seq_len, self.model.config.vocab_size)
        rows = [{k: v[b] for k, v in full.items()} for b in range(wl.batch_size)]
        loader = torch.utils.data.DataLoader(rows, batch_size=wl.batch_size)
        adapter = UlyssesSPDataLoaderAdapter(
            loader,
            sp_rank=mpu.get_sequence_parallel_rank(),
            sp_group=self.sp_group,
            sp_world_size=self.sp_size,
            device=wl.device,
        )
        self.batch = {k: v.to(wl.device) for k, v in next(adapter).items()}

    def forward_backward(self) -> torch.Tensor:
        offload = self.offload if self.offload is not None else contextlib.nullcontext()
        with offload, lv.step_context(self.levers):
            loss = self._loss(self.batch)
            self.engine.backward(loss)
        return loss.detach()

    def update(self) -> None:
        self.engine.step()

    def _loss(self, batch: dict) -> torch.Tensor:
        """ArcticTraining ``SFTTrainer.loss``, sequence-parallel branch with the tiled loss."""
        from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

        shift_labels = batch["shift_labels"]
        inputs = {k: v for k, v in batch.items() if k != "shift_labels"}
        model_with_head = self.engine.module
        hidden_states = model_with_head.model(**inputs, use_cache=False).last_hidden_state
        bs, seqlen = shift_labels.shape
        vocab_size = model_with_head.config.vocab_size
        num_shards = math.ceil(bs * seqlen * vocab_size * 4 / 2**30)  # ~1 GiB of fp32 logits per shard
        total_loss_sum = TiledFusedLogitsLoss.apply(
            _fused_logits_loss,
            model_with_head,
            hidden_states,
            shift_labels,
            None,
            num_shards,
            [model_with_head.lm_head.weight],
            "sum",
        )
        total_good_items = (shift_labels != -100).squeeze().sum()
        loss = total_loss_sum / max(total_good_items, 1)
        losses_per_rank = dist_fn.all_gather(loss, group=self.sp_group)
        good_tokens = (shift_labels != -100).view(-1).sum()
        good_tokens_per_rank = dist_fn.all_gather(good_tokens, group=self.sp_group)
        total_loss = sum(losses_per_rank[r] * good_tokens_per_rank[r] for r in range(self.sp_size))
        return total_loss / sum(good_tokens_per_rank)

    def close(self) -> None:
        destroy(self.engine)  # engine.destroy() + what DeepSpeed keeps referencing afterwards (a DeepSpeed leak)
        self.engine = self.model = self.batch = self.offload = None


def _fused_logits_loss(model_with_head=None, hidden_states=None, shift_labels=None):
    """One shard's summed CE, as ArcticTraining's ``fused_logits_loss_fn``."""
    vocab_size = model_with_head.config.vocab_size
    logits = model_with_head.lm_head(hidden_states)
    if all((shift_labels == -100).squeeze()):
        return (logits.sum() * 0.0).float()
    good_items = ((shift_labels != -100).squeeze()).sum()
    loss = model_with_head.loss_function(logits=logits, labels=None, vocab_size=vocab_size, shift_labels=shift_labels)
    return loss * good_items


def _mlp(self, x):
    return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _tiled_mlp_forward(self, x):
    """ArcticTraining's ``tiled_mlp_forward_common`` on one MLP instance: ceil(seqlen / hidden)
    shards, the max over ranks (ZeRO-3 needs every rank to run the same number)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    seqlen, hidden = x.shape[-2:]
    shards = torch.tensor(math.ceil(seqlen / hidden), device=x.device)
    dist.all_reduce(shards, op=dist.ReduceOp.MAX)
    compute_params = [self.down_proj.weight, self.gate_proj.weight, self.up_proj.weight]
    return TiledMLP.apply(_mlp, self, x, int(shards.item()), compute_params)
