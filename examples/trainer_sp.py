"""The Hugging Face Trainer with Ulysses SP: SPTrainer in place of Trainer, nothing else changes.

    torchrun --nproc_per_node 2 examples/trainer_sp.py --sp-size 2      # CPU: 2 processes, one SP group
    accelerate launch --config_file configs/accelerate/sp2.yaml examples/trainer_sp.py
    python examples/trainer_sp.py --sp-size 1                           # one process, without SP

A tiny random-init Llama (a preset, no download) trains on the bundled corpus and is evaluated under
SP; ``--out DIR`` is the Trainer's output_dir (its log_history lands in DIR/trainer_state.json).
With your own model: ``AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")``,
your datasets of ``{"input_ids": [...]}`` rows and a collator that gives full batches with labels.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import transformers
from torch.utils.data import Subset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from ulysses_sp import load_text_dataset
from ulysses_sp.data import collate_padded
from ulysses_sp.integrations.hf_trainer import SPTrainer
from ulysses_sp.integrations.sp_size import parse_ring_size
from ulysses_sp.train.presets import build_config


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sp-size", type=int, default=None, help="default: the Accelerate config's, else 1")
    p.add_argument(
        "--ring-size", type=parse_ring_size, help="R or auto: hybrid SP (docs/scaling.md); default: the config's"
    )
    p.add_argument("--model", default="tiny-llama", help="preset name, a config file or a model directory")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per row")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", default="runs/trainer_sp", help="the Trainer's output_dir")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    config = build_config(args.model)
    config._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(config)
    rows = load_text_dataset(None, args.seq_len, pack=False)  # one row per document piece
    train, evaluation = Subset(rows, range(0, 96)), Subset(rows, range(96, 120))
    training_args = transformers.TrainingArguments(
        output_dir=args.out,
        use_cpu=not torch.cuda.is_available(),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        per_device_eval_batch_size=2,
        max_steps=args.steps,
        learning_rate=3e-3,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=args.steps // 2,
        save_strategy="no",
        report_to=[],
    )
    trainer = SPTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=collate_padded,
        sp_size=args.sp_size,
        ring_size=args.ring_size,
    )
    trainer.train()
    metrics = trainer.evaluate()  # under SP: no logits, the loss (perplexity = exp(eval_loss))
    trainer.save_state()
    if trainer.is_world_process_zero():
        print(
            f"eval loss {metrics['eval_loss']:.4f} after {trainer.state.global_step} steps "
            f"(engine {trainer.sp_engine}, sp {trainer.sp_topology.sp_size}, ring {trainer.sp_topology.ring_size}); "
            f"log in {args.out}"
        )
    # every rank done, then the process group destroyed before exit: a rank leaving with it alive can abort
    # (SIGABRT) the other's gloo threads, as CI saw after a finished run
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
