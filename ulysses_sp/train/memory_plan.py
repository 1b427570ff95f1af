"""A run's memory features: its flags, or with ``--memory auto`` the cheapest set whose predicted
peak fits the smallest device of the job.

Shape legend: s local tokens of one micro-batch (B * S / P), d hidden size, k key/value width
(Nkv * H), f MLP intermediate size, V vocabulary, L decoder layers, b bytes of the compute dtype.

The prediction is a per-token model of what autograd keeps for a Llama-style decoder layer (bytes
per local token, ``b`` = 2 in bf16):

* no checkpointing, per layer: two RMSNorms (an fp32 copy of the input and the bf16 output, 3bd
  each; b·d each with the norm recompute), the attention kernel's q, k, v and output and the
  output's contiguous copy for o_proj (3bd + 2bk), the MLP's gate, up, SiLU and product (4bf; none
  with the tiled MLP, which keeps only its input); the layer being backpropagated adds the gate's
  and up's gradients (2bf, untiled);
* full checkpointing, per layer: the layer input (bd; 0 with offload), plus one layer's worth of
  the above while it is recomputed and backpropagated (its gradients replace it as they come), or,
  where larger, its attention phase: the layer without the MLP's activations (freed by then) plus
  the attention kernel's backward, the output's gradient, dq, dk, dv and the kernel's fp32 dq
  accumulator (2bd + 2bk + 4d). ``bench_sp.py --memory-sites`` (H100, cuDNN, 128K tokens, full
  checkpointing, tiled MLP, offload, norm recompute) found the fwd+bwd peak inside that kernel,
  which allocates 44 KiB per token: once the MLP is tiled this phase is the layer's largest;
* selective: full's, plus the saved kernel and all-to-all outputs, b(3d + 2k) + 2bd at P > 1 and
  b·d at P = 1 (no all-to-all);
* compiled layers without checkpointing (``--compile``, Inductor): its partitioner recomputes the
  elementwise work in the backward and keeps the matmul and kernel outputs: the norms' inputs (2bd),
  q, k, v before and after RoPE and the kernel's output (3bd + 4bk), the MLP's gate and up (2bf).
  A checkpointed layer's recompute peaks as the eager one does;
* head chunks divide the attention's share of the recomputed layer, and its backward's, by their number;
* the residual stream's gradient (bd) while the layers are backpropagated; the loss's working set
  comes before them and is freed by then: by its path (loss/tiled_ce.py) full logits 10 s V bytes
  (bf16 logits, fp32 logits and their gradient), else 3 GiB (three fp32 tiles of 1 GiB; liger's
  chunks and fp32 weight gradient stay below), plus the backbone's output and its gradient (2bd);
  the larger of the two counts;
* static: 16 bytes per parameter (weights, gradients, AdamW's two moments; fp32, or bf16 with fp32
  masters), 4 of them divided by the ranks that shard weights and gradients (ZeRO-3, FSDP2), 12 by
  those that shard the optimizer state (ZeRO 1-3, FSDP2);
* a layer-wise sharding engine (ZeRO-3, FSDP2; also on one rank) holds two layers' parameters
  gathered in the compute dtype (the running one and the prefetched one) and, under FSDP2, two
  layers' unsharded gradients in fp32 before their reduce-scatter (``--memory-sites`` on one H100
  found 3 to 5 such 0.93 GiB blocks live at a 128K backward's peak, as many as the reduce-scatter
  stream had not yet consumed).

Eight peaks measured on GPUs (H200 and H100; no checkpointing compiled, selective, every feature
with and without head chunks; 64K to 128K tokens; DeepSpeed and FSDP2) lie within 3 % below and
11 % above this model (tests/unit/train/test_memory_plan.py holds them).

Candidates are tried in the order of their measured cost (docs/performance.md: none, selective,
then the norm recompute and offload at under 1 % each, the tiled MLP (+1.0 % at 128K on an H100 since
its backward stopped rerunning the tiled forward and the down projection; ~6 % before), full
checkpointing (+15 % over selective with the other features at 128K), head chunks); the first
whose prediction fits ``MARGIN`` of the device's memory is chosen. Where a costlier candidate predicts no less than a
cheaper one it is never chosen (full checkpointing without the tiled MLP on a model of few layers
at sp=1: their saved attention outputs are less than an untiled MLP's working set). The run then
reports the measured peak next to the prediction.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..core import comm
from ..core.topology import SPTopology, ulysses_of
from ..loss.tiled_ce import DEFAULT_FULL_LOGITS_BYTES, DEFAULT_TILE_BYTES, fits_full
from .plan import RunPlan

#: share of the device's memory a plan may fill (the allocator's fragmentation, kernels' workspaces)
MARGIN = 0.9
GIB = 1 << 30


@dataclass(frozen=True)
class Features:
    """One set of memory features, as launch/train.py's flags set them."""

    grad_ckpt: str = "none"
    offload_activations: bool = False
    recompute_norms: bool = False
    tiled_mlp: bool = False
    head_chunks: int = 1

    def flags(self) -> str:
        parts = [f"--grad-ckpt {self.grad_ckpt}"]
        parts += ["--offload-activations"] if self.offload_activations else []
        parts += ["--recompute-norms"] if self.recompute_norms else []
        parts += ["--tiled-mlp"] if self.tiled_mlp else []
        parts += [f"--head-chunks {self.head_chunks}"] if self.head_chunks > 1 else []
        return " ".join(parts)


#: in the order of their cost in step time (module docstring)
CANDIDATES = (
    Features(),
    Features("selective"),
    Features("selective", recompute_norms=True),
    Features("selective", offload_activations=True, recompute_norms=True),
    Features("selective", offload_activations=True, recompute_norms=True, tiled_mlp=True),
    Features("full", offload_activations=True, recompute_norms=True),
    Features("full", offload_activations=True, recompute_norms=True, tiled_mlp=True),
    Features("full", offload_activations=True, recompute_norms=True, tiled_mlp=True, head_chunks=2),
    Features("full", offload_activations=True, recompute_norms=True, tiled_mlp=True, head_chunks=4),
)


@dataclass(frozen=True)
class Shape:
    """What the prediction needs of the model and the run."""

    d: int
    k: int
    f: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    params: int

    @classmethod
    def of(cls, config, params: int) -> Shape:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        return cls(
            d=config.hidden_size,
            k=kv * head_dim,
            f=getattr(config, "intermediate_size", None) or 4 * config.hidden_size,
            layers=config.num_hidden_layers,
            vocab=config.vocab_size,
            heads=heads,
            kv_heads=kv,
            params=params,
        )


def predicted_peak(
    shape: Shape,
    features: Features,
    tokens: int,
    sp: int,
    dtype_bytes: int,
    static_shards: int,
    optimizer_shards: int,
    compiled: bool = False,
    gathered_by: str | None = None,
) -> int:
    """Predicted peak bytes of one rank: static memory plus the activations of ``tokens`` local tokens
    under ``features`` (module docstring). ``static_shards``: ranks sharding weights and gradients
    (ZeRO-3, FSDP2), ``optimizer_shards``: ranks sharding the optimizer state; ``compiled``: the
    decoder layers run compiled by Inductor; ``gathered_by``: "zero3" or "fsdp2" when that engine
    gathers each layer's parameters for its forward and backward (its in-flight buffers)."""
    assert gathered_by in (None, "zero3", "fsdp2"), gathered_by
    b, d, k, f = dtype_bytes, shape.d, shape.k, shape.f
    norms = 2 * (b * d if features.recompute_norms else 3 * b * d)
    attention = 3 * b * d + 2 * b * k
    kernel_backward = 2 * b * d + 2 * b * k + 4 * d
    mlp = 0 if features.tiled_mlp else 4 * b * f
    mlp_backward = 0 if features.tiled_mlp else 2 * b * f  # the gate's and up's gradients
    layer = norms + attention + mlp  # one layer's activations, no checkpointing
    if features.grad_ckpt == "none":
        if compiled:
            layer = 2 * b * d + 3 * b * d + 4 * b * k + (0 if features.tiled_mlp else 2 * b * f)
        stack = shape.layers * layer
        working = layer + mlp_backward  # the gradients of the layer being backpropagated
    else:
        stack = shape.layers * (0 if features.offload_activations else b * d)
        if features.grad_ckpt == "selective":
            stack += shape.layers * (b * (3 * d + 2 * k) + 2 * b * d if sp > 1 else b * d)
        # the recomputed layer's activations; its gradients replace them as the backward walks back
        chunks = features.head_chunks
        mlp_phase = layer - attention + attention // chunks + mlp_backward
        working = max(mlp_phase, layer - mlp + (attention + kernel_backward) // chunks)
    # the loss's working set, plus the backbone's output and its gradient; freed before the layers'
    # backward, which carries the residual stream's gradient (b·d) instead
    full = fits_full(tokens, shape.vocab, DEFAULT_FULL_LOGITS_BYTES)
    loss = (10 * tokens * shape.vocab if full else 3 * DEFAULT_TILE_BYTES) + 2 * b * d * tokens
    static = shape.params * 4 // static_shards + shape.params * 12 // optimizer_shards
    if gathered_by is not None:
        layer_params = 2 * d * d + 2 * d * k + 3 * d * f  # q, o; k, v; gate, up, down
        static += 2 * layer_params * b + (2 * layer_params * 4 if gathered_by == "fsdp2" else 0)
    return static + tokens * stack + max(loss, tokens * (working + b * d))


def choose(
    shape: Shape,
    tokens: int,
    sp: int,
    dtype_bytes: int,
    device_bytes: int,
    static_shards: int = 1,
    optimizer_shards: int = 1,
    a2a_ranks: int | None = None,
    compiled: bool = False,
    gathered_by: str | None = None,
) -> tuple[Features, int]:
    """The first of :data:`CANDIDATES` (cheapest first) whose predicted peak fits ``MARGIN`` of
    ``device_bytes``, with its prediction; ValueError when none does (with the numbers). Head chunks
    are considered only where apply takes them: whole kv heads per chunk, and at least one query head
    per chunk for each of the all-to-all's ``a2a_ranks`` (default ``sp``; the Ulysses size with a ring).
    ``compiled``: the layers run compiled (a smaller per-layer footprint, module docstring);
    ``gathered_by``: as in :func:`predicted_peak`."""
    budget = int(MARGIN * device_bytes)
    a2a_ranks = sp if a2a_ranks is None else a2a_ranks

    def peak_of(features: Features) -> int:
        return predicted_peak(
            shape, features, tokens, sp, dtype_bytes, static_shards, optimizer_shards, compiled, gathered_by
        )

    for features in CANDIDATES:
        chunks = features.head_chunks
        if chunks > 1 and (shape.kv_heads % chunks or shape.heads // chunks < a2a_ranks):
            continue
        peak = peak_of(features)
        if peak <= budget:
            return features, peak
    best = CANDIDATES[-1]
    peak = peak_of(best)
    raise ValueError(
        f"--memory auto: {tokens} local tokens per rank need about {peak / GIB:.1f} GiB even with every memory "
        f"feature ({best.flags()}), more than {MARGIN:.0%} of the device's {device_bytes / GIB:.1f} GiB; use a "
        "larger --sp-size, a shorter --seq-len or --batch-size, or shard the model (--fsdp, ZeRO-3)"
    )


def engine_sharding(engine_name: str, zero_stage: int | None, world: int) -> tuple[int, int, str | None]:
    """(static_shards, optimizer_shards, gathered_by) of :func:`choose` for the run's engine: FSDP2 and
    ZeRO-3 shard the weights and gradients over the ``world`` ranks and gather layers in flight,
    ZeRO-1/2 shard the optimizer state only, DDP (engine "torch") and ZeRO-0 shard nothing."""
    if engine_name == "fsdp2":
        return world, world, "fsdp2"
    stage = zero_stage or 0
    return (world if stage == 3 else 1), (world if stage >= 1 else 1), ("zero3" if stage == 3 else None)


def memory_features(
    plan: RunPlan, model: torch.nn.Module, topology: SPTopology, device: torch.device
) -> tuple[Features, int | None]:
    """(features, predicted peak bytes or None without --memory auto). Collective under --memory auto:
    every rank plans with the smallest device memory of the job, so all choose alike (head chunks
    change the number of all-to-alls)."""
    config = plan.config
    if config.memory is None:
        return (
            Features(
                config.grad_ckpt,
                config.offload_activations,
                config.recompute_norms,
                config.tiled_mlp,
                config.head_chunks,
            ),
            None,
        )
    if device.type == "cuda":
        total = torch.cuda.mem_get_info(device)[1]
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    total = int(comm.all_reduce(torch.tensor(total, dtype=torch.int64, device=device), None, "min"))
    static_shards, optimizer_shards, gathered_by = engine_sharding(
        plan.engine_name, plan.zero_stage, topology.world_size
    )
    params = sum(p.numel() for p in model.parameters())
    shape = Shape.of(plan.model_config, params)
    tokens = config.batch_size * -(-config.seq_len // topology.sp_size)
    dtype_bytes = torch.finfo(plan.dtype).bits // 8
    a2a_ranks = ulysses_of(topology)[0]
    return choose(
        shape,
        tokens,
        topology.sp_size,
        dtype_bytes,
        total,
        static_shards,
        optimizer_shards,
        a2a_ranks,
        compiled=config.compile is not None,
        gathered_by=gathered_by,
    )
