"""liger-kernel's fused RMSNorm, SiLU * mul and RoPE (``fuse_elementwise``) on one GPU under
``apply`` at sp=1: the loss and every parameter gradient of the unfused model, in the run's dtype
(fp32, bf16 with its tolerance), alone, with the RMSNorm recompute, with the recompute and the
tiled MLP, and (Llama) with Inductor-compiled layers (no graph break; the kernels run outside the compiled
layers only). The kernels' calls are counted, so a silent fallback to the torch ops fails the test.
(The scoping and the family check: tests/unit/memory/test_fused_ops.py; the fused ops in the sp=2
parity of every memory feature: test_memory_features.py.)"""

from __future__ import annotations

import pytest
import torch

import ulysses_sp
from tests.distributed import harness
from tests.helpers import CountingKernels, assert_grads_close, clone, tiny_model, tokens, tolerances
from ulysses_sp.memory.compile import compile_layers
from ulysses_sp.memory.fused_ops import fuse_elementwise, liger_kernels


def _run(model, batch, topo, features: tuple[str, ...]):
    ulysses_sp.enable_checkpointing(model, "selective")
    if "tiled_mlp" in features:
        ulysses_sp.tile_mlp(model, 48)  # 6 tiles of the 2 x 128 local tokens
    if "norms" in features:
        ulysses_sp.enable_rms_norm_recompute(model)
    ulysses_sp.apply(model, topo)
    if "compile" in features:
        compile_layers(model)
    loss = ulysses_sp.causal_lm_loss(model, batch, topo)
    loss.backward()
    return loss.detach()


def _body_liger(ctx):
    import torch._dynamo.utils as dynamo_utils

    topo = ulysses_sp.init_sp(1)
    ids = tokens(2, 128, seed=7, device=ctx.device)
    batch = ulysses_sp.shard_batch({"input_ids": ids, "labels": ids}, topo)
    tol = tolerances(ctx.dtype)
    for preset in ("tiny-llama-gqa", "tiny-qwen3"):  # Qwen3: per-head q/k norms too
        base = tiny_model(preset, seed=3, dtype=ctx.dtype).to(ctx.device)
        layers = base.config.num_hidden_layers
        compiled = (("compile",),) if preset == "tiny-llama-gqa" else ()  # one Inductor build per dtype
        for features in ((), ("norms",), ("norms", "tiled_mlp"), *compiled):
            ref, model = clone(base), clone(base)
            counting = CountingKernels(liger_kernels())
            fuse_elementwise(model, counting.kernels)
            torch._dynamo.reset()
            dynamo_utils.counters.clear()
            want = _run(ref, batch, topo, features)
            got = _run(model, batch, topo, features)
            label = f"{preset} {'+'.join(features) or 'fused'} {ctx.dtype}"
            if "compile" in features:  # compiled layers trace the torch ops; the final norm runs liger's
                assert not dynamo_utils.counters["graph_break"], (label, dict(dynamo_utils.counters["graph_break"]))
                assert counting.calls == {"rms_norm": 1, "silu_mul": 0, "rope": 0}, (label, counting.calls)
            else:  # forward and the selective checkpoint's recomputation
                norms = sum(1 for m in model.modules() if hasattr(m, "variance_epsilon"))
                assert counting.calls["rms_norm"] >= norms, (label, counting.calls)
                assert counting.calls["silu_mul"] >= 2 * layers and counting.calls["rope"] >= 2 * layers, label
            torch.testing.assert_close(got, want, **tol, msg=lambda m, label=label: f"{label}: {m}")
            assert_grads_close(model, ref, **tol)


@pytest.mark.gpu
def test_liger_fused_ops_match_torch_gpu():
    if not harness.on_gpu():
        pytest.skip("GPU-only: liger's triton kernels; run with ULYSSES_SP_TEST_BACKEND=nccl on a CUDA machine")
    pytest.importorskip("liger_kernel")
    harness.run(_body_liger, 1)
