"""Shared helpers of the tests: tiny models, deterministic batches, tolerances, grad comparison."""

from __future__ import annotations

import contextlib
import copy
import os
import socket
import subprocess
import sys

import torch
import transformers

from ulysses_sp.train.presets import build_config

#: the repository's root (launch/, configs/, examples/ are read from there)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model(name: str, seed: int = 0, attn: str = "sdpa", dtype=torch.float32, **overrides):
    """A random-init preset model, identical on every rank for the same seed."""
    torch.manual_seed(seed)
    config = build_config(name, **overrides)
    config._attn_implementation = attn
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.train()


#: the smallest shape of the family tests below (override per family)
_SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)


def small_model(config_class: str, seed: int = 0, attn: str | None = None, **overrides):
    """A random-init model of the transformers config class ``config_class`` at a tiny shape
    (``attn``: its attention implementation, default the model's)."""
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**{**_SMALL, **overrides})
    if attn is not None:
        config._attn_implementation = attn
    return transformers.AutoModelForCausalLM.from_config(config)


def tokens(batch: int, seq: int, vocab: int = 256, seed: int = 1, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g).to(device)


def tolerances(dtype: torch.dtype) -> dict:
    """fp32: tight; bf16: documented loose bound (docs/testing.md)."""
    if dtype == torch.bfloat16:
        return dict(rtol=2e-2, atol=2e-2)
    return dict(rtol=1e-5, atol=1e-5)


def clone(model):
    return copy.deepcopy(model)


def assert_grads_close(model, ref, rtol: float, atol: float) -> int:
    """Every parameter's .grad equal to the reference's; returns how many were compared.

    ``atol`` is relative to each reference tensor's largest entry (at least 1): summing P ranks'
    contributions reorders fp32 additions, which moves near-zero entries of a large gradient by
    ~1e-7 of its scale, while the bugs this guards against are O(1) of it."""
    ref_params = dict(ref.named_parameters())
    n = 0
    for name, p in model.named_parameters():
        r = ref_params[name]
        if r.grad is None:
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, f"{name}: grad where reference has none"
            continue
        assert p.grad is not None, f"{name}: no gradient under SP"
        scale = max(1.0, r.grad.abs().max().item())
        torch.testing.assert_close(p.grad, r.grad, rtol=rtol, atol=atol * scale, msg=lambda m: f"{name}: {m}")
        n += 1
    assert n > 0, "no gradients compared"
    return n


# --- launching commands (end-to-end tests) ----------------------------------------------------------


def free_port() -> int:
    """A TCP port free on this host now (for a launcher's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict:
    """The environment of a launched command: this checkout importable, one thread per rank, gloo."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("ULYSSES_SP_TEST_BACKEND", None)
    env.update(extra)
    return env


#: launcher -> (module run with python -m, its process-count flag)
_LAUNCHERS = {
    "torchrun": ("torch.distributed.run", "--nproc_per_node"),
    "deepspeed": ("deepspeed.launcher.runner", "--num_gpus"),
}


def launcher_command(launcher: str, nproc: int, script: str, *args) -> list[str]:
    """``script args`` under torchrun or the deepspeed launcher with ``nproc`` processes."""
    module, count = _LAUNCHERS[launcher]
    return [sys.executable, "-m", module, count, str(nproc), "--master_port", str(free_port()), script, *map(str, args)]


def run_ok(cmd: list[str], timeout: float = 600, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """Run ``cmd`` to completion; fail the test with the tail of its output unless it exits 0 (a
    ``check=True`` run would hide the launched command's traceback)."""
    out = subprocess.run(
        cmd, env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False
    )
    assert out.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    )
    return out


def flags(**values) -> list[str]:
    """Command-line flags from keyword arguments: ``flags(sp_size=2, pack=True)`` -> ``--sp-size 2 --pack``."""
    out = []
    for name, value in values.items():
        out += [f"--{name.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return out


# --- fused elementwise kernels (memory/fused_ops.py) -------------------------------------------------


class CountingKernels:
    """:class:`ulysses_sp.memory.fused_ops.FusedKernels` whose ops count their calls; ``base`` None:
    the ops in plain torch (transformers' Llama math, so the fused model computes what the unfused
    one does, bit for bit), which run on ``device_type`` (CPU: liger's triton kernels cannot)."""

    def __init__(self, base=None, device_type: str = "cpu"):
        from transformers.models.llama import modeling_llama

        from ulysses_sp.memory.fused_ops import FusedKernels

        self.calls = {"rms_norm": 0, "silu_mul": 0, "rope": 0}

        def torch_rms_norm(x, weight, eps):
            rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
            return weight * (x.float() * rstd).to(x.dtype)

        ops = base or FusedKernels(
            torch_rms_norm,
            lambda gate, up: torch.nn.functional.silu(gate) * up,
            modeling_llama.apply_rotary_pos_emb,
            device_type,
        )

        def counted(name):
            def op(*args):
                self.calls[name] += 1
                return getattr(ops, name)(*args)

            return op

        self.kernels = FusedKernels(counted("rms_norm"), counted("silu_mul"), counted("rope"), ops.device_type)


@contextlib.contextmanager
def linear_calls(matches):
    """The output dtype of every ``F.linear`` call made in the block whose weight ``matches(weight)``
    (a list). Counts a projection without a module hook, which the tiled MLP's down-projection skip
    would see and turn itself off for."""
    calls, linear = [], torch.nn.functional.linear

    def counting(x, weight, bias=None):
        y = linear(x, weight, bias)
        if matches(weight):
            calls.append(y.dtype)
        return y

    torch.nn.functional.linear = counting
    try:
        yield calls
    finally:
        torch.nn.functional.linear = linear
