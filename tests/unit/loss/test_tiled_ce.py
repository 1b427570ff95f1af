"""The tiled cross-entropy without communication: equal to the full-logits CE (values and grads)
at any tile size, peak tensor memory bounded by one tile, logit processing of model families."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tests.helpers import small_model
from ulysses_sp.loss.logits import LogitTransform, logit_transform
from ulysses_sp.loss.tiled_ce import (
    choose_loss_path,
    fits_full,
    liger_unsupported_reason,
    tile_tokens_for_budget,
    tiled_cross_entropy_sum,
)


class PeakTensorBytes(TorchDispatchMode):
    """Bytes of tensor storage created inside the mode (forward and backward) that are alive at
    once: the peak, and the largest single storage. Storages are freed when their last tensor dies."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.largest = 0
        self._refs: dict[int, list[int]] = {}  # data_ptr -> [nbytes, live tensors]

    def _release(self, key: int) -> None:
        entry = self._refs[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.untyped_storage().nbytes() == 0:
                continue
            key, nbytes = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
            if key in self._refs:
                self._refs[key][1] += 1
            else:
                self._refs[key] = [nbytes, 1]
                self.live += nbytes
                self.peak, self.largest = max(self.peak, self.live), max(self.largest, nbytes)
            weakref.finalize(t, self._release, key)
        return out


def _problem(T=61, D=16, V=40, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(D, V, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, D, generator=g))
        if bias:
            head.bias.copy_(torch.randn(V, generator=g))
    hidden = torch.randn(T, D, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (T,), generator=g)
    labels[torch.rand(T, generator=g) < 0.3] = -100
    return head, hidden, labels


@pytest.mark.parametrize(
    "transform", [LogitTransform(), LogitTransform(scale=0.5, softcap=3.0)], ids=["plain", "scale-softcap"]
)
def test_tiled_equals_full_logits_ce(transform):
    head, hidden, labels = _problem()
    ref = F.cross_entropy(transform(head(hidden)).float(), labels, ignore_index=-100, reduction="sum")
    ref_grads = torch.autograd.grad(ref, [hidden, head.weight, head.bias])
    for tile in (2, 7, 16, 61, 1000):  # 7 and 16 do not divide 61 tokens
        got = tiled_cross_entropy_sum(hidden, labels, head, tile, transform)
        grads = torch.autograd.grad(got, [hidden, head.weight, head.bias])
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"tile {tile}: {m}")
        for name, a, b in zip(("hidden", "weight", "bias"), grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"tile {tile} {name}: {m}")
    with torch.no_grad():
        torch.testing.assert_close(tiled_cross_entropy_sum(hidden, labels, head, 9, transform), ref.detach())
    ignored = torch.full_like(labels, -100)
    zero = tiled_cross_entropy_sum(hidden, ignored, head, 7, transform)
    assert zero.item() == 0.0
    assert torch.count_nonzero(torch.autograd.grad(zero, hidden)[0]) == 0
    with pytest.raises(ValueError, match="tile_tokens"):
        tiled_cross_entropy_sum(hidden, labels, head, 0, transform)


def test_full_path_keeps_logits_and_matches():
    """recompute=False (the "full" path): the same loss and gradients, the head run once (no
    recomputation in the backward); the path choice by size and liger availability."""
    head, hidden, labels = _problem()
    calls = []
    head.register_forward_hook(lambda *_: calls.append(1))
    ref = tiled_cross_entropy_sum(hidden, labels, head, 16)
    ref_grads = torch.autograd.grad(ref, [hidden, head.weight])
    assert len(calls) == 2 * 4  # 4 tiles, each recomputed
    calls.clear()
    got = tiled_cross_entropy_sum(hidden, labels, head, hidden.shape[0], recompute=False)
    grads = torch.autograd.grad(got, [hidden, head.weight])
    assert len(calls) == 1
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    V, budget = 1000, 4 * 1000 * 64  # the fp32 logits of 64 tokens
    assert fits_full(64, V, budget) and not fits_full(65, V, budget)
    assert choose_loss_path(fits_full(64, V, budget), None, None) == "full"
    assert choose_loss_path(fits_full(65, V, budget), None, None) == "liger"
    assert choose_loss_path(fits_full(65, V, budget), "not installed", None) == "tiled"
    assert choose_loss_path(fits_full(65, V, budget), None, False) == "tiled"
    assert choose_loss_path(fits_full(8, V, budget), None, True) == "liger"  # required: at every size
    with pytest.raises(ValueError, match="use_liger=True but the fused liger loss cannot run: not installed"):
        choose_loss_path(fits_full(8, V, budget), "not installed", True)


def test_peak_memory_bounded_by_one_tile():
    T, D, V, tile = 4096, 32, 4096, 256
    head, hidden, labels = _problem(T, D, V, bias=False)
    full_logits, tile_logits = T * V * 4, tile * V * 4  # 64 MiB, 4 MiB fp32
    grads = (T * D + V * D) * 4  # hidden.grad and weight.grad, which stay alive

    with PeakTensorBytes() as full:
        F.cross_entropy(head(hidden), labels, reduction="sum").backward()
    assert full.largest >= full_logits and full.peak >= 2 * full_logits  # the tracker sees the logits

    hidden.grad = head.weight.grad = None
    with PeakTensorBytes() as tiled:
        tiled_cross_entropy_sum(hidden, labels, head, tile).backward()
    assert tiled.largest <= tile_logits, f"a tensor of {tiled.largest} B, more than one tile's logits"
    assert tiled.peak <= 4 * tile_logits + grads, f"peak {tiled.peak / 2**20:.1f} MiB"
    assert tiled.peak * 8 < full.peak
    assert tile_tokens_for_budget(V, tile_logits) == tile and tile_tokens_for_budget(10**9, 1) == 1


def _tiny(cls_name: str, **kw):
    return small_model(cls_name, attn="eager", **kw).eval()


@pytest.mark.parametrize(
    "cls_name,kw,expected",
    [
        ("Gemma2Config", dict(head_dim=8, final_logit_softcapping=0.7), LogitTransform(softcap=0.7)),
        ("CohereConfig", dict(logit_scale=3.0), LogitTransform(scale=3.0)),
        ("GraniteConfig", dict(logits_scaling=4.0), LogitTransform(scale=0.25)),
        ("LlamaConfig", {}, LogitTransform()),
    ],
)
def test_model_logit_processing_matches_transformers_loss(cls_name, kw, expected):
    model = _tiny(cls_name, **kw)
    transform = logit_transform(model)
    assert transform == expected
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, :4] = -100
    shift = torch.full_like(labels, -100)
    shift[:, :-1] = labels[:, 1:]
    with torch.no_grad():
        ref = model(input_ids=ids, labels=labels).loss  # transformers' own logits and loss (mean)
        hidden = model.base_model(input_ids=ids)[0].flatten(0, 1)
        got = tiled_cross_entropy_sum(hidden, shift.flatten(), model.get_output_embeddings(), 5, transform)
    torch.testing.assert_close(got / (shift != -100).sum(), ref, rtol=1e-5, atol=1e-6)


def test_unsupported_logit_processing_and_liger_gating():
    model = _tiny("LlamaConfig")
    model.config.output_multiplier = 2.0
    with pytest.raises(ValueError, match="output_multiplier"):
        logit_transform(model)
    del model.config.output_multiplier
    model.config.logits_scaling = 2.0  # a name with no known meaning for llama
    with pytest.raises(ValueError, match="logits_scaling"):
        logit_transform(model)
    head, hidden, _ = _problem(bias=True)
    reason = liger_unsupported_reason(hidden, head, LogitTransform())
    assert reason is not None and ("not installed" in reason or "CUDA" in reason)
