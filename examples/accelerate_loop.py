"""Your own training loop with Accelerate and ulysses_sp.

    accelerate launch --config_file configs/accelerate/sp2.yaml examples/accelerate_loop.py
    python examples/accelerate_loop.py --sp-size 1        # the same run in one process, without SP

The SP size comes from the Accelerate config (``parallelism_config_sp_size`` with
``parallelism_config_sp_backend: ulysses_sp``) unless ``--sp-size`` is given; hybrid SP's ring size
from its ``parallelism_config_cp_size`` unless ``--ring-size`` is given. Compared with a plain
Accelerate loop there are three changes: ``claim_sp_size()`` before the Accelerator is created,
``prepare_sp`` instead of ``accelerator.prepare`` for the model, optimizer and dataloader, and
``train_step`` for each optimizer step (the loss normalisation and gradient accumulation that make
the gradient equal to the non-SP run's). ``--metrics FILE`` appends one JSON line per step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import nullcontext

import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from ulysses_sp import claim_sp_size, load_text_dataset, prepare_sp, train_step
from ulysses_sp.data import collate_padded
from ulysses_sp.integrations.sp_size import parse_ring_size
from ulysses_sp.train.presets import build_config


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sp-size", type=int, default=None, help="default: the Accelerate config's, else 1")
    p.add_argument(
        "--ring-size", type=parse_ring_size, help="R or auto: hybrid SP (docs/scaling.md); default: the config's"
    )
    p.add_argument("--model", default="tiny-llama", help="preset name or a local config.json")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=2, help="sequences per micro-batch per DP replica")
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metrics", default=None, metavar="FILE")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    claim_sp_size()  # the Accelerate config's SP size becomes ours; Accelerate must not see it (no ALST)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=args.grad_accum,
        # shuffle from (seed, epoch): the same order for any number of processes
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    set_seed(args.seed)  # the same streams on every rank: the SP group shuffles identically

    model = transformers.AutoModelForCausalLM.from_config(build_config(args.model))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    dataset = load_text_dataset(None, args.seq_len, pack=False)  # bundled corpus, byte tokens
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, collate_fn=collate_padded, drop_last=True)

    topology, model, optimizer, loader = prepare_sp(
        accelerator, model, optimizer, loader, sp_size=args.sp_size, ring_size=args.ring_size
    )
    accelerator.print(f"{topology}, {len(loader)} batches per epoch per DP replica")

    batches = (batch for _ in iter(int, 1) for batch in loader)  # epoch after epoch (Accelerate reshuffles)
    write = args.metrics and accelerator.is_main_process
    with open(args.metrics, "a") if write else nullcontext() as metrics:
        for step in range(1, args.steps + 1):
            micro = [next(batches) for _ in range(args.grad_accum)]  # this rank's shards of the step
            loss = train_step(accelerator, model, optimizer, micro, topology, max_grad_norm=1.0)
            accelerator.print(f"step {step}: loss {float(loss):.4f}")
            if metrics is not None:
                metrics.write(json.dumps({"step": step, "loss": float(loss)}) + "\n")
                metrics.flush()
    accelerator.end_training()


if __name__ == "__main__":
    main()
