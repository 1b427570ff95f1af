"""RL under SP against one process: per-token log-probs and entropy equal the single-process model's
log_softmax at the labels (fp32), for the policy (with gradients) and a separate reference model (no
gradients, nothing kept); every policy loss type with clipping and a KL term, and every parameter
gradient after the engine's average over the world, equal the non-SP computation over the whole step.
Rows of 23 tokens (not divisible by P): one packed row of two documents, one padded row, prompts
masked; two micro-batches per DP replica; MHA on sdpa and GQA on eager (packed documents on the other
kernels: tests/distributed/core/test_masks.py, through the same model forward)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

import ulysses_sp
from tests.distributed import harness
from tests.helpers import (
    ROOT,
    assert_grads_close,
    clone,
    flags,
    launcher_command,
    run_ok,
    tiny_model,
    tokens,
    tolerances,
)
from ulysses_sp.core import comm

SEQ, MICRO, TEMPERATURE = 23, 2, 0.7
DOCS = [[(0, 7), (7, 23)], [(0, 19)]]  # per row: documents (start, end); row 1 is padding after 19
LOSSES = [("token_mean", {}), ("sequence_mean", {}), ("sequence_sum", {"max_length": SEQ})]


def _full_batch(dp: int, mb: int, device):
    """Micro-batch ``mb`` of DP replica ``dp``: the full rows shard_batch cuts, and per-token RL inputs."""
    ids = tokens(2, SEQ, seed=500 + 10 * dp + mb, device=device)
    labels = ids.clone()
    labels[0, :3] = -100  # prompt of document 1
    labels[0, 7:10] = -100  # prompt of document 2
    labels[1, :5] = -100
    labels[1, 19:] = -100  # padding
    mask = torch.ones(2, SEQ, dtype=torch.long, device=device)
    mask[1, 19:] = 0
    g = torch.Generator().manual_seed(900 + 10 * dp + mb)
    extra = {
        "advantages": torch.randn(2, 1, generator=g).to(device),  # one advantage per sequence (GRPO)
        "noise": (0.3 * torch.randn(2, SEQ, generator=g)).to(device),  # old policy = current + noise
    }
    batch = {"input_ids": ids, "labels": labels, "seq_lens": [[7, 16], [SEQ]], "attention_mask": mask}
    return batch, extra


def _reference_logprobs(model, ids, labels, entropy=False):
    """[B, SEQ] log p(next token) with every document run alone; 0 where the next label is ignored."""
    out = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    ent = torch.zeros_like(out)
    for b, docs in enumerate(DOCS):
        for start, end in docs:
            logp = torch.log_softmax(model(input_ids=ids[b : b + 1, start:end]).logits[0].float() / TEMPERATURE, -1)
            for i in range(start, end - 1):  # the document's last token predicts nothing
                if labels[b, i + 1] != -100:
                    out[b, i] = logp[i - start, labels[b, i + 1]]
                    ent[b, i] = -(logp[i - start].exp() * logp[i - start]).sum()
    return (out, ent) if entropy else out


def _step(ctx, topo, preset, backend, loss_type, options):
    tol = tolerances(ctx.dtype)
    policy = tiny_model(preset, seed=1, attn=backend, dtype=ctx.dtype).to(ctx.device)
    reference = tiny_model(preset, seed=2, attn=backend, dtype=ctx.dtype).to(ctx.device)
    policy_ref = clone(policy)
    step = {(d, m): _full_batch(d, m, ctx.device) for d in range(topo.dp_size) for m in range(MICRO)}

    # one process: the whole step, every micro-batch of every replica, normalised over all of it
    full = {}
    for key, (batch, extra) in step.items():
        lp, ent = _reference_logprobs(policy_ref, batch["input_ids"], batch["labels"], entropy=True)
        with torch.no_grad():
            ref_lp = _reference_logprobs(reference, batch["input_ids"], batch["labels"])
        mask = torch.zeros_like(lp, dtype=torch.bool)
        mask[:, :-1] = batch["labels"][:, 1:] != -100
        mask[0, 6] = False  # the end of document 1 predicts nothing
        full[key] = dict(lp=lp, ent=ent, ref=ref_lp, old=(lp + extra["noise"]).detach(), mask=mask, **extra)
    one = _single()
    n = ulysses_sp.count_policy_items([f["mask"] for f in full.values()], one, loss_type)
    losses = {}
    for key, f in full.items():
        losses[key] = ulysses_sp.policy_loss(
            f["lp"],
            f["advantages"],
            f["mask"],
            one,
            old_logprobs=f["old"],
            ref_logprobs=f["ref"],
            loss_type=loss_type,
            clip_eps=0.1,
            clip_eps_high=0.3,
            kl_coef=0.05,
            num_items=n,
            **options,
        )
    sum(losses.values()).backward()

    # SP: this rank's shards of its replica's micro-batches
    ulysses_sp.apply(policy, topo)
    ulysses_sp.apply(reference, topo)
    mine = []
    for m in range(MICRO):
        batch, _ = step[(topo.dp_rank, m)]
        f = full[(topo.dp_rank, m)]
        local = ulysses_sp.shard_batch(batch, topo)
        shard = {k: ulysses_sp.shard_tokens(f[k], topo) for k in ("lp", "ent", "ref", "old", "mask")}
        lp, ent = ulysses_sp.token_logprobs(policy, local, topo, temperature=TEMPERATURE, entropy=True)
        torch.testing.assert_close(lp, shard["lp"].detach(), **tol, msg=lambda e: f"{preset} log-probs: {e}")
        torch.testing.assert_close(ent, shard["ent"].detach(), **tol, msg=lambda e: f"{preset} entropy: {e}")
        torch.testing.assert_close(ulysses_sp.gather_tokens(lp, topo, SEQ), f["lp"].detach(), **tol)
        saved = []
        with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            ref_lp = ulysses_sp.token_logprobs(reference, local, topo, temperature=TEMPERATURE)
        assert not saved and not ref_lp.requires_grad, "the reference model kept activations"
        torch.testing.assert_close(ref_lp, shard["ref"], **tol, msg=lambda e: f"{preset} reference: {e}")
        mine.append((lp, ref_lp, shard))
    n_mine = ulysses_sp.count_policy_items([shard["mask"] for _, _, shard in mine], topo, loss_type)
    assert float(n_mine) == pytest.approx(float(n) / topo.dp_size)
    for m, (lp, ref_lp, shard) in enumerate(mine):
        loss = ulysses_sp.policy_loss(
            lp,
            full[(topo.dp_rank, m)]["advantages"],
            shard["mask"],
            topo,
            old_logprobs=shard["old"],
            ref_logprobs=ref_lp,
            loss_type=loss_type,
            clip_eps=0.1,
            clip_eps_high=0.3,
            kl_coef=0.05,
            num_items=n_mine,
            **options,
        )
        want = losses[(topo.dp_rank, m)].detach() * topo.dp_size  # normalised by N / dp
        torch.testing.assert_close(loss.detach(), want, **tol, msg=lambda e: f"{preset} {loss_type} mb{m}: {e}")
        loss.backward()
    for p in policy.parameters():  # what DDP / DeepSpeed do: average over all world ranks
        if p.grad is not None:
            p.grad = comm.all_reduce(p.grad, None) / topo.world_size
    assert_grads_close(policy, policy_ref, **tol)
    assert all(p.grad is None for p in reference.parameters())


def _single():
    """A world of one for the reference computation (no collective is called at sp = dp = 1)."""
    from types import SimpleNamespace

    return SimpleNamespace(sp_size=1, sp_rank=0, dp_size=1, dp_rank=0, world_size=1, sp_group=None, dp_group=None)


def _body(ctx, sp_size):
    topo = ulysses_sp.init_sp(sp_size)
    for preset, backend in (("tiny-llama", "sdpa"), ("tiny-llama-gqa", "eager")):  # MHA and GQA; two kernels
        for loss_type, options in LOSSES:
            _step(ctx, topo, preset, backend, loss_type, options)


@pytest.mark.parametrize("world,sp", [(2, 2), (4, 4), (4, 2)], ids=["sp2", "sp4", "dp2xsp2"])
def test_logprobs_and_policy_losses_match_one_process(world, sp):
    harness.run(_body, world, sp)


def _body_liger(ctx):
    topo = ulysses_sp.init_sp(1)
    model = tiny_model("tiny-llama-gqa", seed=3, dtype=ctx.dtype).to(ctx.device)
    twin = clone(model)
    batch, _ = _full_batch(0, 0, ctx.device)
    local = ulysses_sp.shard_batch(batch, topo)
    weights = torch.randn(local["shift_labels"].shape, generator=torch.Generator().manual_seed(4)).to(ctx.device)
    fused = ulysses_sp.token_logprobs(model, local, topo, temperature=TEMPERATURE, use_liger=True)
    plain = ulysses_sp.token_logprobs(twin, local, topo, temperature=TEMPERATURE, use_liger=False)
    tol = tolerances(ctx.dtype)
    torch.testing.assert_close(fused, plain, **tol)
    (fused * weights).sum().backward()
    (plain * weights).sum().backward()
    assert_grads_close(model, twin, **tol)


@pytest.mark.gpu
def test_liger_and_torch_logprobs_agree_gpu():
    if not harness.on_gpu():
        pytest.skip("GPU-only: run with ULYSSES_SP_TEST_BACKEND=nccl on a CUDA machine")
    pytest.importorskip("liger_kernel")
    harness.run(_body_liger, 1)


@pytest.mark.slow
def test_grpo_example_matches_one_process(tmp_path):
    """examples/grpo_step.py at sp2 (torchrun) gives the numbers of the same iteration without SP: the
    loss, the completions' log-probs after the update and the updated weights."""
    example = os.path.join(ROOT, "examples", "grpo_step.py")
    runs = {}
    for name, cmd in (
        ("sp2", launcher_command("torchrun", 2, example, *flags(sp_size=2, out=tmp_path / "sp2"))),
        ("one", [sys.executable, example, *flags(sp_size=1, out=tmp_path / "one")]),
    ):
        run_ok(cmd, timeout=300)
        runs[name] = json.loads((tmp_path / name).read_text())
    assert runs["sp2"]["reward"] == runs["one"]["reward"]  # the same completions on every rank and run
    for key in ("loss", "completion_logprob_after", "param_abs_sum"):
        assert runs["sp2"][key] == pytest.approx(runs["one"][key], rel=1e-5, abs=1e-6), (key, runs)
