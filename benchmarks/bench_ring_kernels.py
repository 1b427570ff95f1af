"""Speed and memory of the ring's block kernels on one device: ring attention at ring size 1 (one
process, its own group: the ring's autograd Function, its merge and backward, every block local),
forward + backward, per attention implementation (torch kernel for sdpa/eager, flex, flash-attn 2).

    python benchmarks/bench_ring_kernels.py --seq-len 16384 --kernels sdpa,flash_attention_2,flex_attention

Shape legend: B = 1, S sequence (two ring chunks of S/2), nq/nk query/kv heads on the rank (after
Ulysses: a Llama-8B layer at u = 4 has 8 and 2), H head dim. One JSON line per kernel: mean ms of
forward + backward over ``--steps`` after two warm-up steps (which also compile flex), peak memory
above the inputs' in GiB, and the speed-up over the torch kernel (list it first). ``--docs N`` packs N
equal documents; ``--window W`` a sliding window.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from ulysses_sp.core import ring
from ulysses_sp.core.backends.spec import AttnSpec
from ulysses_sp.core.sequence_info import SequenceInfo, build_sequence_info


def _info(S: int, docs: int, device) -> SequenceInfo:
    if docs <= 1:
        return SequenceInfo(S)
    n = S // docs
    pos = torch.cat([torch.arange(n)] * (docs - 1) + [torch.arange(S - n * (docs - 1))]).view(1, S)  # [1, S]
    return build_sequence_info(pos).to(device)


def measure(kernel: str, args, device) -> dict:
    """Mean ms of one forward + backward of ring.attend at ring size 1, and the peak memory."""
    g = torch.Generator(device=device).manual_seed(0)
    shapes = [(1, args.seq_len, n, args.head_dim) for n in (args.heads, args.kv_heads, args.kv_heads)]  # [B, S, n, H]
    q, k, v = (torch.randn(s, device=device, generator=g, dtype=torch.bfloat16).requires_grad_() for s in shapes)
    do = torch.randn_like(q)
    info = _info(args.seq_len, args.docs, device)

    def step():
        spec = AttnSpec(True, args.head_dim**-0.5, 0.0, args.window, None, info, None)
        ring.check_supported(kernel, spec, q, k, v)
        ring.attend(kernel, q, k, v, spec, dist.group.WORLD, 0, 1).backward(do)

    for _ in range(2):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    ms = (time.perf_counter() - start) / args.steps * 1e3
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else None
    return {"kernel": kernel, "seq_len": args.seq_len, "docs": args.docs, "window": args.window, "ms": round(ms, 2),
            "peak_gib": None if peak is None else round(peak, 2)}  # fmt: skip


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--docs", type=int, default=1)
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--kernels", default="sdpa,flash_attention_2,flex_attention")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="append the JSON lines to this file too")
    args = p.parse_args(argv)
    if args.seq_len % 2:
        raise SystemExit(f"--seq-len {args.seq_len} must be even: the ring's two chunks")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    torch_ms = None  # the torch kernel's time, for the speed-ups of the kernels after it
    for kernel in args.kernels.split(","):
        try:
            row = measure(kernel, args, device)
        except (ValueError, ImportError, torch.OutOfMemoryError) as e:  # a kernel that cannot run here
            row = {"kernel": kernel, "seq_len": args.seq_len, "error": f"{type(e).__name__}: {e}"[:300]}
        if "ms" in row:
            torch_ms = row["ms"] if kernel in ("sdpa", "eager") and torch_ms is None else torch_ms
            row["vs_torch_kernel"] = None if torch_ms is None else round(torch_ms / row["ms"], 2)
        print(json.dumps(row), flush=True)  # each row as it comes: a later kernel may run out of time
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
