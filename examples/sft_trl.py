"""TRL's SFTTrainer with Ulysses SP: SPSFTTrainer in place of SFTTrainer, packing included.

    torchrun --nproc_per_node 2 examples/sft_trl.py --sp-size 2      # CPU: 2 processes, one SP group
    accelerate launch --config_file configs/accelerate/sp2.yaml examples/sft_trl.py
    python examples/sft_trl.py --sp-size 1                           # one process: stock SFTTrainer

A tiny random-init Llama (a preset, no download) is fine-tuned on prompt-completion pairs from the
bundled corpus (a sentence, then the next one) with a byte-level tokenizer built here (ids = UTF-8
bytes, the tiny presets' vocabulary): SFTTrainer tokenises, masks the prompts out of the loss
(completion_only_loss) and packs several pairs into each row (padding-free, positions restarting
per pair); it is evaluated under SP. ``--out DIR`` is the output_dir (its log_history lands in
DIR/trainer_state.json). With your own model: ``AutoModelForCausalLM.from_pretrained(path,
attn_implementation="sdpa")`` and its tokenizer as ``processing_class``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import datasets
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers.convert_slow_tokenizer import bytes_to_unicode
from trl import SFTConfig, SFTTrainer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from ulysses_sp.data.text import CORPUS_PATH
from ulysses_sp.integrations.sp_size import parse_ring_size
from ulysses_sp.integrations.trl import SPSFTTrainer
from ulysses_sp.train.presets import build_config


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sp-size", type=int, default=None, help="1: stock SFTTrainer; default: the Accelerate config's")
    p.add_argument(
        "--ring-size", type=parse_ring_size, help="R or auto: hybrid SP (docs/scaling.md); default: the config's"
    )
    p.add_argument("--model", default="tiny-llama", help="preset name, a config file or a model directory")
    p.add_argument("--max-length", type=int, default=512, help="tokens per packed row (about 3 pairs)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", default="runs/sft_trl", help="the trainer's output_dir")
    return p.parse_args(argv)


def byte_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Token id = UTF-8 byte (byte-level BPE without merges); byte 0 pads, byte 4 (end of transmission) ends."""
    chars = bytes_to_unicode()  # byte -> the printable character byte-level tokenizers use for it
    tokenizer = Tokenizer(models.BPE(vocab={c: b for b, c in chars.items()}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=chars[0], eos_token=chars[4])


def sentence_pairs() -> datasets.Dataset:
    """Rows ``{"prompt": sentence, "completion": " " + the next sentence}`` of each corpus paragraph."""
    with open(CORPUS_PATH, encoding="utf-8") as f:
        paragraphs = [p.replace("\n", " ").strip() for p in f.read().split("\n\n") if p.strip()]
    rows = []
    for paragraph in paragraphs:
        sentences = re.split(r"(?<=[.!?]) ", paragraph)
        rows += [{"prompt": a, "completion": " " + b} for a, b in zip(sentences, sentences[1:])]
    return datasets.Dataset.from_list(rows)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    config = build_config(args.model)
    config._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(config)
    pairs = sentence_pairs()
    sft_args = SFTConfig(
        output_dir=args.out,
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),  # SFTConfig's default (True) would autocast to bf16 on CPU too
        max_length=args.max_length,
        packing=True,  # best-fit decreasing into rows of max_length, padding-free
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        per_device_eval_batch_size=2,
        max_steps=args.steps,
        learning_rate=3e-3,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=max(1, args.steps // 2),
        save_strategy="no",
        report_to=[],
    )
    common = dict(
        model=model,
        args=sft_args,
        train_dataset=pairs.select(range(0, 200)),
        eval_dataset=pairs.select(range(200, 240)),
        processing_class=byte_tokenizer(),
    )
    trainer = (
        SFTTrainer(**common)
        if args.sp_size == 1
        else SPSFTTrainer(**common, sp_size=args.sp_size, ring_size=args.ring_size)
    )
    trainer.train()
    metrics = trainer.evaluate()  # under SP: the loss and SFTTrainer's token metrics, no logits
    trainer.save_state()
    if trainer.is_world_process_zero():
        print(f"eval loss {metrics['eval_loss']:.4f} after {trainer.state.global_step} steps; log in {args.out}")
    # every rank done, then the process group destroyed before exit: a rank leaving with it alive can abort
    # (SIGABRT) the other's gloo threads, as CI saw after a finished run
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
