"""Model FLOPs of one training step and MFU.

Convention (what "model FLOPs" counts; recomputation is never counted):

* Matmuls of the weights: ``6 * N * T``. ``N`` = parameters of every ``nn.Linear`` of the model,
  i.e. the decoder layers' projections *and* the output head (untied or tied, it is a matmul);
  the input embedding (a lookup), norms and biases-free extras are not matmuls and are excluded.
  ``T`` = tokens per optimizer step over all replicas (B * S * dp). 2 FLOPs per multiply-add in
  the forward, twice that in the backward (gradients of the input and of the weight).
* Causal self-attention, counted once per (query, key) pair a causal mask keeps: a sequence of S
  tokens has ``S(S+1)/2`` pairs. Per pair and query head the forward does ``QK^T`` (d_qk MACs) and
  ``PV`` (d_v MACs): ``2(d_qk + d_v)`` FLOPs; the backward does dQ, dK (d_qk MACs each), dP, dV
  (d_v MACs each): twice the forward. So per layer and sequence
  ``F_attn = 6 (d_qk + d_v) n_q S(S+1)/2`` (= ``6 n_q d_h S(S+1)`` for d_qk = d_v = d_h, i.e.
  ``~ 6 d_attn S^2`` with d_attn = n_q d_h: the "2*2*S^2/2*d_attn" forward, times 3).
  The backward's recomputation of QK^T inside flash kernels is not counted (it is not model work).

``F_step = 6 N T + L * B * dp * F_attn``; ``MFU = F_step / (t_step * n_gpus * peak)`` with ``peak``
the dense bf16 peak of one GPU (989e12 for H100/H200 SXM). Used by the trainer's metrics and its
end-of-run summary, and by benchmarks/bench_sp.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

FORMULA = (
    "MFU = F_step / (t_step * n_gpus * peak_flops_per_gpu); "
    "F_step = 6*N*T + L*B*dp*6*(d_qk+d_v)*n_q*S*(S+1)/2; N = params of all nn.Linear (decoder "
    "projections + output head, no input embedding); T = B*S*dp tokens per step; causal attention "
    "counted once per kept (query,key) pair, backward = 2x forward; recomputation (activation "
    "checkpointing, flash backward's QK^T) not counted"
)


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP count needs from a model."""

    matmul_params: int  # N: parameters of every nn.Linear (incl. the output head)
    layers: int  # L: attention layers
    q_heads: int  # n_q
    qk_head_dim: int  # d_qk
    v_head_dim: int  # d_v

    def to_dict(self) -> dict:
        return asdict(self)


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters of every nn.Linear of ``model`` (weight and bias); ZeRO-3-partitioned params count
    their full size (``ds_numel``)."""
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            for p in module.parameters(recurse=False):
                total += int(getattr(p, "ds_numel", p.numel()))
    return total


def shape_of(model: torch.nn.Module) -> ModelShape:
    """The FLOP-relevant shape of a transformers decoder model."""
    config = model.config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    qk = getattr(config, "qk_head_dim", None) or head_dim
    v = getattr(config, "v_head_dim", None) or head_dim
    return ModelShape(matmul_params(model), config.num_hidden_layers, heads, qk, v)


def attention_flops(shape: ModelShape, seq_len: int) -> float:
    """Training FLOPs of causal attention in all layers for one sequence of ``seq_len`` tokens."""
    pairs = seq_len * (seq_len + 1) / 2
    return shape.layers * 6.0 * (shape.qk_head_dim + shape.v_head_dim) * shape.q_heads * pairs


def step_flops(shape: ModelShape, seq_len: int, sequences: int) -> float:
    """``F_step`` for ``sequences`` sequences (B * dp) of ``seq_len`` tokens each."""
    tokens = seq_len * sequences
    return 6.0 * shape.matmul_params * tokens + sequences * attention_flops(shape, seq_len)


def document_step_flops(shape: ModelShape, tokens: int, document_lengths: torch.Tensor) -> float:
    """``F_step`` for ``tokens`` tokens whose attention runs within documents of ``document_lengths``
    tokens each (packed rows: a document attends only to itself, so S(S+1)/2 per row overcounts)."""
    lengths = document_lengths.to(torch.float64)
    pairs = float((lengths * (lengths + 1) / 2).sum())
    attention = shape.layers * 6.0 * (shape.qk_head_dim + shape.v_head_dim) * shape.q_heads * pairs
    return 6.0 * shape.matmul_params * tokens + attention


#: dense bf16/fp16 tensor-core peak FLOP/s of one GPU, by a substring of its CUDA device name
PEAK_HALF_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "B200": 2250e12, "A100": 312e12, "A800": 312e12}


def gpu_peak_flops(device_name: str) -> float | None:
    """The dense half-precision peak of the GPU called ``device_name``, or None when unknown."""
    return next((peak for key, peak in PEAK_HALF_FLOPS.items() if key in device_name), None)


def mfu(flops: float, step_s: float, n_gpus: int, peak_flops: float) -> float:
    """Model FLOPs utilisation in [0, 1]."""
    return flops / (step_s * n_gpus * peak_flops)
