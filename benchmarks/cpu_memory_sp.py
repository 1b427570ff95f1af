"""Where one SP training step peaks in memory, per phase, measured on CPU ranks (no GPU needed).

    torchrun --nproc_per_node 2 benchmarks/cpu_memory_sp.py --tokens 8192

Each rank runs one forward + backward of a random Llama-shaped bf16 model with SP applied (full
checkpointing, tiled MLP, tiled loss) per configuration and samples the C heap in use (glibc
``mallinfo2``, as benchmarks/cpu_memory.py) after every dispatched op. Every sample is attributed to
a phase: the forward, the recomputation of a layer, the backward of the tiled MLP, of an RMSNorm
recompute, of attention (its kernel's backward and the all-to-alls), or the rest of the backward.
Printed on rank 0, in copies of the local hidden state (s x d bf16, s = S/P), above the level
before the step: the peak of each phase and where the step's peak is.

At real sizes a tile of the MLP or of the norm's math is a small part of s (d tokens, 2^24
elements); ``--mlp-tile`` and ``--norm-tile-elements`` shrink the tiles so that the CPU run has
the same proportions (defaults: 1/64 of the local tokens each).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
import torch.distributed as dist
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cpu_memory import heap_bytes, llama_config

import ulysses_sp
from ulysses_sp.loss.tiled_ce import tiled_cross_entropy_sum
from ulysses_sp.memory import rms_norm, tiled_mlp
from ulysses_sp.memory.activation_checkpointing import enable_checkpointing

CONFIGS = {"full+tiled_mlp": False, "full+tiled_mlp+norms": True}
PHASES = ("forward", "layer recompute", "MLP backward", "norm backward", "attention backward", "other backward")


class _Phases(TorchDispatchMode):
    """Heap peak per phase; ``label`` is set by the wrapped backward functions, the rest by op/node."""

    def __init__(self, start: int):
        super().__init__()
        self.start, self.label, self.backward = start, None, False
        self.peaks = dict.fromkeys(PHASES, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if self.label is not None:
            phase = self.label
        elif "attention" in name or "all_to_all" in name:
            phase = "attention backward" if self.backward else "forward"
        elif self.backward:  # the engine runs backward ops without grad mode; a checkpoint's recompute with it
            phase = "layer recompute" if torch.is_grad_enabled() else "other backward"
        else:
            phase = "forward"
        self.peaks[phase] = max(self.peaks[phase], heap_bytes() - self.start)
        return out


def _labelled(function_cls, label: str, mode_ref: list):
    """Wrap an autograd Function's backward so that its ops count as ``label``."""
    inner = function_cls.backward

    def backward(ctx, *grads):
        mode = mode_ref[0]
        if mode is None or mode.label is not None:
            return inner(ctx, *grads)
        mode.label = label
        try:
            return inner(ctx, *grads)
        finally:
            mode.label = None

    function_cls.backward = staticmethod(backward)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=8192, help="sequence length (all SP ranks together)")
    p.add_argument("--mlp-tile", type=int, default=None, help="tokens per MLP tile (default: local tokens / 64)")
    p.add_argument(
        "--norm-tile-elements",
        type=int,
        default=None,
        help="elements per tile of the RMSNorm math (default: local tokens x d / 64)",
    )
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    topo = ulysses_sp.init_sp(dist.get_world_size())
    local = args.tokens // topo.sp_size
    rms_norm.TILE_ELEMENTS = args.norm_tile_elements or max(1, local * args.hidden // 64)
    mode_ref: list = [None]
    _labelled(tiled_mlp.TiledMLP, "MLP backward", mode_ref)
    _labelled(rms_norm.RMSNormFunction, "norm backward", mode_ref)
    config = llama_config(args.layers, args.hidden, args.ffn, args.tokens)
    ids = torch.randint(0, config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    batch = ulysses_sp.shard_batch({"input_ids": ids, "labels": ids}, topo)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "shift_labels")}
    copy = local * args.hidden * 2  # bytes of one local hidden state [s, d] in bf16
    if dist.get_rank() == 0:
        print(
            f"Llama shape: {args.layers} layers, d={args.hidden}, d_ff={args.ffn}, {args.tokens} tokens over "
            f"sp={topo.sp_size} ({local} per rank), bf16, full checkpointing, tiled MLP and loss; "
            f"peaks in copies of the local hidden state ({copy / 2**20:.1f} MiB)"
        )
        print(f"{'configuration':<22} " + " ".join(f"{p:>11.11}" for p in PHASES) + "  step peak in")
    for name, norms in CONFIGS.items():
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).train()
        enable_checkpointing(model, "full")
        tiled_mlp.tile_mlp(model, args.mlp_tile or max(1, local // 64))
        if norms:
            ulysses_sp.enable_rms_norm_recompute(model)
        ulysses_sp.apply(model, topo)
        with _Phases(heap_bytes()) as mode:
            mode_ref[0] = mode
            hidden = model.model(**inputs, use_cache=False).last_hidden_state  # [1, s, d]
            loss = tiled_cross_entropy_sum(hidden[0], batch["shift_labels"][0], model.lm_head, 1024)
            mode.backward = True
            loss.backward()
        mode_ref[0] = None
        if dist.get_rank() == 0:
            top = max(mode.peaks, key=mode.peaks.get)
            print(f"{name:<22} " + " ".join(f"{mode.peaks[p] / copy:>11.2f}" for p in PHASES) + f"  {top}")
        del model, hidden, loss
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
