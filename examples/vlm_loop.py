"""Your own training loop for a vision-language model (Qwen2.5-VL / Qwen3-VL) under Ulysses SP.

    torchrun --nproc_per_node 2 examples/vlm_loop.py --sp-size 2     # CPU: one SP group of 2
    torchrun --nproc_per_node 2 examples/vlm_loop.py --sp-size 1     # the same global batches, dp2
    torchrun --nproc_per_node 1 examples/vlm_loop.py                 # one process

A tiny random-init Qwen2.5-VL (built from a config, no download) learns synthetic documents: text, an
image of random pixels, text. With a real model the documents are its processor's outputs, one per
sample (``input_ids``, ``mm_token_type_ids``, ``pixel_values``, ``image_grid_thw``, with the batch
dimension dropped) plus ``labels`` (e.g. -100 on the prompt); the data path ignores the labels of the
image tokens, so the loss covers the text only.

What SP needs (docs/vlm.md): ``apply`` the model; pack whole documents (their images stay with their
tokens); ``SPDataLoader(..., vlm=True)`` hands every rank of an SP group the whole rows with their
images and its shard's labels; ``causal_lm_loss`` with ``count_label_tokens``; the gradients averaged
over all ranks (what DDP / DeepSpeed do). The vision tower runs on every rank over the whole sample,
the model shards its language model's inputs after merging the image features.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import ulysses_sp
from ulysses_sp.data import PackedDataset, SPDataLoader

IMAGE, START, END = 250, 251, 252  # the tiny vocabulary's image placeholder, vision start / end


def tiny_qwen2_5_vl(seed: int = 0) -> transformers.Qwen2_5_VLForConditionalGeneration:
    """2 text layers of width 64 (4 heads, 2 kv heads, mRoPE), a 2-block vision tower of 2x2 patches."""
    torch.manual_seed(seed)
    config = transformers.Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=2, spatial_merge_size=2,
            temporal_patch_size=1, window_size=4, out_hidden_size=64, fullatt_block_indexes=[1],
        ),
        image_token_id=IMAGE, vision_start_token_id=START, vision_end_token_id=END,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    return transformers.Qwen2_5_VLForConditionalGeneration(config)


def synthetic_documents(count: int, seed: int = 0) -> list[dict]:
    """``count`` documents of 3-9 text tokens, an image of 4x4 or 4x8 patches (4 or 8 tokens), 2-6 tokens."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for i in range(count):
        h, w = 4, 4 * (1 + i % 2)
        text = lambda n: torch.randint(3, 240, (n,), generator=g)  # noqa: E731
        before, after = text(3 + i % 7), text(2 + i % 5)
        image = torch.tensor([START] + [IMAGE] * (h * w // 4) + [END])
        ids = torch.cat([before, image, after])
        kind = (ids == IMAGE).long()  # mm_token_type_ids: 0 text, 1 image
        docs.append(
            {
                "input_ids": ids,
                "labels": ids,  # every text token learns; shard_batch(vlm=True) ignores the image tokens
                "mm_token_type_ids": kind,
                "pixel_values": torch.randn(h * w, 3 * 2 * 2, generator=g),  # [patches, C * T * p * p]
                "image_grid_thw": torch.tensor([[1, h, w]]),
            }
        )
    return docs


def train(model, documents, topology, *, steps: int, seq_len: int, batch_size: int, lr: float, device) -> list:
    """``steps`` AdamW steps over rows of whole documents; returns each step's loss (the global token mean)."""
    model = ulysses_sp.apply(model.to(device), topology)
    rows = PackedDataset(documents, seq_len, whole_documents=True)  # an image never leaves its document
    loader = SPDataLoader(rows, topology, batch_size, shuffle=True, seed=0, vlm=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    while len(losses) < steps:
        for local in loader:  # rows whole, with their images; shift_labels of this rank's shard
            local = ulysses_sp.to_device(local, device)
            n = ulysses_sp.count_label_tokens(local, topology)  # the step's labelled tokens / dp
            loss = ulysses_sp.causal_lm_loss(model, local, topology, n)
            loss.backward()
            for p in model.parameters():  # the engine's reduction: the average over all ranks
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= dist.get_world_size()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(ulysses_sp.reduce_loss_for_logging([loss], topology).item())
            if len(losses) == steps:
                break
    ulysses_sp.remove(model)
    return losses


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sp-size", type=int, default=None, help="default: every process")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=48, help="rows of at most this many tokens")
    p.add_argument("--batch-size", type=int, default=2, help="rows per step and DP replica")
    p.add_argument("--lr", type=float, default=1e-3)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    dist.init_process_group("gloo")  # from torchrun's environment (--nproc_per_node 1: one process)
    topology = ulysses_sp.init_sp(args.sp_size or dist.get_world_size())
    losses = train(
        tiny_qwen2_5_vl(),
        synthetic_documents(24),
        topology,
        steps=args.steps,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        lr=args.lr,
        device=torch.device("cpu"),
    )
    if dist.get_rank() == 0:
        print(json.dumps({"losses": losses}))
    # every rank done, then the process group destroyed before exit: a rank leaving with it alive can abort
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
