"""Policy losses and per-token helpers without processes: the formulas on hand-made numbers, the
normalisations, shard_tokens against shard_batch, and the errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import ulysses_sp
from tests.helpers import tiny_model, tokens

ONE = SimpleNamespace(sp_size=1, sp_rank=0, dp_size=1, dp_rank=0, world_size=1, sp_group=None, dp_group=None)


def test_clipped_objective_kl_and_normalisations():
    lp = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -1.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.2, -1.5, -0.5], [-1.5, -2.0, 0.0]])
    ref = torch.tensor([[-1.1, -2.0, -0.4], [-1.4, -1.1, 0.0]])
    adv = torch.tensor([[1.0], [-2.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    ratio = torch.exp(lp - old)
    pg = -torch.minimum(ratio * adv, ratio.clamp(0.9, 1.3) * adv)
    kl = torch.exp(ref - lp) - (ref - lp) - 1
    per_token = (pg + 0.1 * kl) * mask
    expect = {
        "token_mean": per_token.sum() / 5,
        "sequence_mean": (per_token[0].sum() / 3 + per_token[1].sum() / 2) / 2,
        "sequence_sum": per_token.sum() / (2 * 8),
    }
    for loss_type, want in expect.items():
        got = ulysses_sp.policy_loss(
            lp,
            adv,
            mask,
            ONE,
            old_logprobs=old,
            ref_logprobs=ref,
            loss_type=loss_type,
            clip_eps=0.1,
            clip_eps_high=0.3,
            kl_coef=0.1,
            max_length=8,
        )
        torch.testing.assert_close(got, want.detach(), msg=loss_type)
    on_policy = ulysses_sp.policy_loss(lp, adv, mask, ONE)  # ratio 1 with the gradient of the log-probs
    on_policy.backward()
    torch.testing.assert_close(lp.grad, -(adv * mask) / 5)
    assert ulysses_sp.policy_loss(lp, adv, torch.zeros_like(mask), ONE).item() == 0.0  # no token: 0, not NaN
    assert ulysses_sp.count_policy_items(mask, ONE, "token_mean").item() == 5
    assert ulysses_sp.count_policy_items([mask, mask[:1]], ONE, "sequence_mean").item() == 3


def test_policy_loss_errors():
    lp, mask = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"unknown loss_type 'ppo'; choose one of \['token_mean'"):
        ulysses_sp.policy_loss(lp, lp, mask, ONE, loss_type="ppo")
    with pytest.raises(ValueError, match="'sequence_sum' divides by sequences x max_length: give max_length > 0"):
        ulysses_sp.policy_loss(lp, lp, mask, ONE, loss_type="sequence_sum")
    with pytest.raises(ValueError, match=r"kl_coef=0.1 needs ref_logprobs"):
        ulysses_sp.policy_loss(lp, lp, mask, ONE, kl_coef=0.1)
    with pytest.raises(ValueError, match=r"logprobs and mask must be \[B, s\] of the same shape"):
        ulysses_sp.policy_loss(lp, lp, mask[:, :2], ONE)


def test_shard_tokens_cuts_like_shard_batch_and_gather_undoes_it():
    ids = tokens(2, 7)
    for P in (2, 3):
        for r in range(P):
            topo = SimpleNamespace(sp_size=P, sp_rank=r)
            torch.testing.assert_close(
                ulysses_sp.shard_tokens(ids, topo), ulysses_sp.shard_batch({"input_ids": ids}, topo)["input_ids"]
            )
    assert torch.equal(ulysses_sp.gather_tokens(ids, ONE, 5), ids[:, :5])
    with pytest.raises(ValueError, match=r"length must be in 1..7"):
        ulysses_sp.gather_tokens(ids, ONE, 9)


def test_token_logprobs_errors_and_a_single_process_match():
    model = tiny_model("tiny-llama")
    ids = tokens(2, 9)
    local = ulysses_sp.shard_batch({"input_ids": ids, "labels": ids}, ONE)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ulysses_sp.token_logprobs(model, local, ONE, temperature=0.0)
    with pytest.raises(ValueError, match="use_liger=True but liger's fused log-probs cannot run"):
        ulysses_sp.token_logprobs(model, local, ONE, use_liger=True)
    lp = ulysses_sp.token_logprobs(model, local, ONE, tile_tokens=4)  # tiles across rows
    want = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[:, :-1].gather(2, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(lp[:, :-1], want)
    assert torch.equal(lp[:, -1], torch.zeros(2))  # the last token predicts nothing
