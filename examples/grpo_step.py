"""One GRPO iteration with Ulysses SP: sample completions, score them, update the policy under SP.

    torchrun --nproc_per_node 2 examples/grpo_step.py --sp-size 2      # CPU: one SP group of 2
    python examples/grpo_step.py --sp-size 1                           # the same iteration without SP

1. Generation runs without SP (KV caches do not shard): every rank samples the same completions from
   the same seed, G per prompt, from a tiny random-init Llama (a preset, no download).
2. A toy reward (the share of letters among the completion's bytes); advantages are normalised
   within each prompt's group (GRPO).
3. Under SP: the sampling policy's and the reference model's per-token log-probs
   (``ulysses_sp.token_logprobs``, the reference a second model with SP applied separately, under
   no_grad), then the clipped GRPO loss with a KL term (``ulysses_sp.policy_loss``), its backward,
   the gradients averaged over all ranks (what DDP / DeepSpeed do) and one AdamW step.
``--out FILE`` writes the iteration's numbers as JSON; they equal the run without SP.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch
import torch.distributed as dist
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import ulysses_sp
from ulysses_sp.train.presets import build_config


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sp-size", type=int, default=None, help="default: every process")
    p.add_argument("--group", type=int, default=4, help="completions per prompt")
    p.add_argument("--new-tokens", type=int, default=21, help="completion length")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--out", default=None, help="write the iteration's numbers here (JSON)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if "RANK" in os.environ:  # started by torchrun
        dist.init_process_group("gloo")
    else:  # one process without a launcher: an in-memory store, no port to collide on
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    topo = ulysses_sp.init_sp(args.sp_size or dist.get_world_size())

    torch.manual_seed(0)
    config = build_config("tiny-llama")
    config._attn_implementation = "sdpa"
    policy = transformers.AutoModelForCausalLM.from_config(config)
    reference = copy.deepcopy(policy).eval()  # the policy before the update

    # 1. completions, sampled without SP, the same on every rank
    prompts = [b"The river ", b"At night the "]
    prompt_ids = torch.tensor([list(p[:10]) for p in prompts])  # [2, 10] byte tokens
    torch.manual_seed(1)
    with torch.no_grad():
        prompt_rows = prompt_ids.repeat_interleave(args.group, 0)  # [2 * G, 10]
        ids = policy.generate(
            prompt_rows,
            attention_mask=torch.ones_like(prompt_rows),
            pad_token_id=0,
            do_sample=True,
            top_k=0,
            temperature=args.temperature,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
        )  # [2 * G, 10 + new tokens]
    completions = ids[:, prompt_ids.shape[1] :]

    # 2. rewards and group-normalised advantages
    rewards = torch.tensor([sum(chr(t).isalpha() for t in row.tolist()) / len(row) for row in completions])
    grouped = rewards.view(len(prompts), args.group)
    advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1, 1)

    # 3. the update under SP
    ulysses_sp.apply(policy, topo)
    ulysses_sp.apply(reference, topo)
    labels = ids.clone()
    labels[:, : prompt_ids.shape[1]] = -100  # only the completions are learned
    local = ulysses_sp.shard_batch({"input_ids": ids, "labels": labels}, topo)  # this rank's shard
    mask = local["shift_labels"] != -100
    with torch.no_grad():
        old = ulysses_sp.token_logprobs(policy, local, topo, temperature=args.temperature)
        ref = ulysses_sp.token_logprobs(reference, local, topo, temperature=args.temperature)
    logprobs = ulysses_sp.token_logprobs(policy, local, topo, temperature=args.temperature)
    loss = ulysses_sp.policy_loss(
        logprobs,
        advantages,
        mask,
        topo,
        old_logprobs=old,
        ref_logprobs=ref,
        loss_type="sequence_mean",
        kl_coef=0.04,
    )
    loss.backward()
    for p in policy.parameters():  # the engine's reduction: the average over all ranks
        dist.all_reduce(p.grad)
        p.grad /= dist.get_world_size()
    torch.optim.AdamW(policy.parameters(), lr=1e-3).step()

    with torch.no_grad():
        after = ulysses_sp.token_logprobs(policy, local, topo, temperature=args.temperature)
    after = ulysses_sp.gather_tokens(after, topo, ids.shape[1])  # [2 * G, length]: the full rollouts
    result = {
        "reward": rewards.mean().item(),
        "loss": loss.item(),
        "completion_logprob_after": (after.sum() / (labels[:, 1:] != -100).sum()).item(),
        "param_abs_sum": sum(p.abs().sum().item() for p in policy.parameters()),
    }
    if dist.get_rank() == 0:
        print(json.dumps(result))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
