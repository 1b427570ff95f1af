"""Activation memory of the checkpointing policies and the tiled MLP, measured on CPU (no GPU needed).

    python benchmarks/cpu_memory.py --tokens 8192

One process, one random Llama-shaped bf16 model, one forward + backward through the tiled loss per
configuration. Memory is the C heap in use (glibc ``mallinfo2``: in-use small blocks + mmapped
blocks), sampled after every dispatched op: "held" is what the forward leaves for the backward,
"peak" the maximum during forward + backward, both above the level before the step. Checks the
per-token model of docs/memory.md: the tiled MLP removes ~8 d_ff bytes per token from the peak,
full checkpointing keeps ~2d per token and layer, RMSNorm recompute (``+norms``) removes ~10d per
token from what a layer holds during its backward. (Checkpoint offload is not shown: on CPU its
copy stays in the same memory.) Linux with glibc >= 2.33 only.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import os
import sys
import warnings

import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from ulysses_sp.loss.tiled_ce import tiled_cross_entropy_sum
from ulysses_sp.memory import rms_norm
from ulysses_sp.memory.activation_checkpointing import enable_checkpointing
from ulysses_sp.memory.rms_norm import enable_rms_norm_recompute
from ulysses_sp.memory.tiled_mlp import tile_mlp

CONFIGS = {
    "none": ("none", False, False),
    "none+norms": ("none", False, True),
    "full": ("full", False, False),
    "full+tiled_mlp": ("full", True, False),
    "full+tiled_mlp+norms": ("full", True, True),
    "selective": ("selective", False, False),
    "selective+tiled_mlp": ("selective", True, False),
    "selective+tiled_mlp+norms": ("selective", True, True),
}


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def heap_bytes() -> int:
    info = _libc.mallinfo2()
    return info.uordblks + info.hblkhd


class _Peak(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, heap_bytes())
        return out


def measure(model, ids: torch.Tensor) -> tuple[int, int]:
    """(bytes held after the forward, peak bytes during forward + backward) above the start. ids [1, S]."""
    gc.collect()  # the previous configuration's model (a tiled MLP's forward refers to its module: a cycle)
    start = heap_bytes()
    with _Peak() as peak:
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state  # [1, S, d]
        loss = tiled_cross_entropy_sum(hidden[0], ids[0], model.lm_head, 1024)
        held = heap_bytes() - start
        loss.backward()
    return held, peak.peak - start


def llama_config(layers: int, hidden: int, ffn: int, tokens: int) -> transformers.LlamaConfig:
    """The Llama shape both memory benchmarks measure (8 heads, 2 kv heads, sdpa)."""
    config = transformers.LlamaConfig(
        vocab_size=1024,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=tokens,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    return config


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument(
        "--norm-tile-elements",
        type=int,
        default=rms_norm.TILE_ELEMENTS,
        help="elements per tile of the RMSNorm recompute's fp32 math (the library's default: "
        "%(default)s); a smaller tile here shows what the default does at long sequences",
    )
    args = p.parse_args(argv)
    rms_norm.TILE_ELEMENTS = args.norm_tile_elements
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(1)
    config = llama_config(args.layers, args.hidden, args.ffn, args.tokens)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).to(torch.bfloat16).train()
    ids = torch.randint(0, config.vocab_size, (1, args.tokens))
    print(
        f"Llama shape: {args.layers} layers, d={args.hidden}, d_ff={args.ffn}, {args.tokens} tokens, bf16; "
        f"2d = {2 * args.hidden} B, 8 d_ff = {8 * args.ffn} B per token"
    )
    print(f"{'configuration':<22} {'held MiB':>9} {'peak MiB':>9} {'peak B/token':>13}")
    for name, (policy, tiled, norms) in CONFIGS.items():
        model = copy.deepcopy(base)
        enable_checkpointing(model, policy)
        if tiled:
            tile_mlp(model)
        if norms:
            enable_rms_norm_recompute(model)
        held, peak = measure(model, ids)
        print(f"{name:<22} {held / 2**20:>9.1f} {peak / 2**20:>9.1f} {peak / args.tokens:>13.0f}")


if __name__ == "__main__":
    main()
