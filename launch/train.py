"""Train a causal LM with Ulysses sequence parallelism.

    deepspeed --num_gpus 8 launch/train.py --sp-size 4 --deepspeed configs/deepspeed/zero3.json
    torchrun --nproc_per_node 4 launch/train.py --sp-size 2 --device cpu
    accelerate launch --config_file configs/accelerate/sp2.yaml launch/train.py

DP = world / SP. Every rank of an SP group reads the same samples and keeps S/P tokens of them.
Metrics (JSON lines, ``--metrics``): step, loss (global token mean), tokens (per step, all ranks),
tok_per_s (all ranks), tok_per_s_per_gpu, peak_mem_gb, lr, grad_norm, step_time_s; with
``--eval-every``, lines with step, eval_loss, eval_ppl, eval_tokens, eval_batches, eval_time_s.

Checkpoints: ``--save-dir DIR --save-every N``, then ``--resume DIR`` (docs/checkpointing.md).
Errors and what to do about them: docs/troubleshooting.md.
"""

from __future__ import annotations

import argparse
import os
import sys

from torch.distributed.elastic.multiprocessing.errors import record

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import ulysses_sp  # noqa: E402
from ulysses_sp.train.run import run  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sp-size", type=int, default=None, help="SP group size (default: the DeepSpeed JSON's "
                   "sequence_parallel_size, else the Accelerate config's, else 1)")
    p.add_argument("--model", default="tiny-llama", help="preset name or a local config.json / model directory")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch per DP replica")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", default=None, help="default: bundled corpus; or .txt, .jsonl, datasets dir")
    p.add_argument("--pack", action="store_true", help="pack documents into rows (positions reset per doc)")
    p.add_argument("--attn", default=None, choices=list(ulysses_sp.SUPPORTED_ATTENTION),
                   help="core attention kernel (default: flash_attention_2 on CUDA when installed, else sdpa)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"])
    p.add_argument("--deepspeed", default=None, metavar="CONFIG.json", help="train with DeepSpeed (ZeRO config); "
                   "under accelerate launch with distributed_type DEEPSPEED: its deepspeed_config_file")
    p.add_argument("--grad-ckpt", nargs="?", const="full", default="none", choices=["none", "full", "selective"],
                   help="activation checkpointing of the decoder layers; bare --grad-ckpt: full; selective also "
                        "saves the attention and all-to-all outputs (docs/memory.md)")
    p.add_argument("--tiled-mlp", action="store_true", help="run each decoder layer's MLP over token tiles")
    p.add_argument("--recompute-norms", action="store_true",
                   help="RMSNorms keep only their input for the backward (no fp32 copy; docs/memory.md)")
    p.add_argument("--offload-activations", action="store_true",
                   help="keep the layers' checkpoints in host memory (needs --grad-ckpt full or selective)")
    p.add_argument("--metrics", default=None, metavar="FILE", help="append JSON lines per step")
    p.add_argument("--timeout-s", type=float, default=600.0,
                   help="collective timeout of every process group: a stalled or dead rank fails the job after it")
    p.add_argument("--check-identical", action="store_true", help="verify the SP group reads identical samples")
    p.add_argument("--allow-longer-than-max-positions", action="store_true",
                   help="allow --seq-len above the model's max_position_embeddings (RoPE models only)")
    p.add_argument("--save-dir", default=None, metavar="DIR", help="write checkpoints here (and at the last step)")
    p.add_argument("--save-every", type=int, default=0, metavar="N", help="checkpoint every N steps (0: last only)")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue from a --save-dir (its newest checkpoint) or one step_* directory of it")
    p.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="evaluate on the held-out split every N steps and at the last step (0: never)")
    p.add_argument("--eval-batches", type=int, default=None, metavar="K",
                   help="batches per DP replica per evaluation (default: the whole held-out split)")
    p.add_argument("--eval-fraction", type=float, default=0.05,
                   help="share of documents held out for evaluation, chosen by content hash (with --eval-every)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.offload_activations and args.grad_ckpt == "none":
        p.error("--offload-activations moves the layers' checkpoints to host memory: add --grad-ckpt (full or selective)")
    return args


@record  # under torchrun: the failing rank's traceback goes into the launcher's failure summary
def main(argv=None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
