"""TrainConfig: the settings of one launch/train.py run, typed, validated once, never changed after.

Every flag of launch/train.py is a field here, with its help text and argparse options in the
field's metadata, so that the command line (cli.py), the docs and the code read one definition.
Validation runs in ``__post_init__`` and needs no process group: every rank gets the same command
line, so a bad value raises the same ValueError on every rank before any of them joins a
collective, and no rank is left waiting for one that stopped. Each message names the flag, the
value and the fix (docs/troubleshooting.md lists them). What depends on the machine or on files
(the device, the model's config, the DeepSpeed JSON, a checkpoint to resume) is resolved and
checked afterwards, still before distributed init, in plan.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..core.backends import SUPPORTED as SUPPORTED_ATTENTION
from ..core.checks import check_int
from ..memory.activation_checkpointing import POLICIES
from ..memory.compile import BACKENDS as COMPILE_BACKENDS

#: --dtype values: our short names and torch's
DTYPES = ("fp32", "bf16", "fp16", "float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")


def _flag(help_text: str, shown_default: str | None = None, **argparse_kwargs) -> dict:
    """Field metadata: the flag's help (also its row in docs/configuration.md), how its default reads
    there when it is not a plain value, and its extra argparse options."""
    return {"help": help_text, "shown_default": shown_default, "argparse": argparse_kwargs}


@dataclass(frozen=True)
class TrainConfig:
    """launch/train.py's flags (``--seq-len`` is ``seq_len``); see docs/configuration.md."""

    sp_size: int | None = field(
        default=None,
        metadata=_flag(
            "SP group size. Resolution: --sp-size, else the DeepSpeed JSON's sequence_parallel_size, else the "
            "Accelerate config's (parallelism_config_sp_size x parallelism_config_cp_size with "
            "parallelism_config_sp_backend: ulysses_sp, or ULYSSES_SP_SIZE), else 1; two sources that differ are "
            "an error. The world size must be a multiple; dp = world / sp",
            "from the configs, else 1",
            metavar="K",
        ),
    )
    ring_size: str | None = field(
        default=None,
        metadata=_flag(
            "R or auto. Hybrid SP: ring attention across R groups of sp/R Ulysses ranks (sp must be a multiple of "
            "R; R = sp is pure ring). auto: the smallest R that gives every Ulysses rank a query head and keeps "
            "each Ulysses group inside a node (docs/scaling.md). Resolution: --ring-size, else the DeepSpeed "
            "JSON's sequence_parallel_ring_size, else the Accelerate config's (parallelism_config_cp_size with "
            "parallelism_config_sp_backend: ulysses_sp, or ULYSSES_SP_RING_SIZE), else 1; two sources that "
            "differ are an error. Ring attention runs with --attn sdpa, eager, flex_attention (CUDA for "
            "training) or flash_attention_2 (not flash_attention_3)",
            "from the configs, else 1",
            metavar="R",
        ),
    )
    model: str = field(
        default="tiny-llama",
        metadata=_flag(
            "a preset (listed below), a model's config file (any file name) or a model directory (its config.json; "
            "its weights are loaded when it has .safetensors / .bin files, else random init). Nothing is downloaded",
            metavar="NAME",
        ),
    )
    seq_len: int = field(
        default=256,
        metadata=_flag(
            "tokens per row (>= 2): longer documents are split into rows of at most L; with --pack, rows of exactly L "
            "(the last may be shorter)",
            metavar="L",
        ),
    )
    batch_size: int = field(
        default=1,
        metadata=_flag("sequences per micro-batch per DP replica (all ranks of an SP group share them)", metavar="B"),
    )
    grad_accum: int = field(
        default=1,
        metadata=_flag(
            "micro-batches per optimizer step; every micro-batch's loss is normalised by the labelled tokens of the "
            "whole step over all DP replicas",
            metavar="M",
        ),
    )
    steps: int = field(default=10, metadata=_flag("optimizer steps"))
    lr: float = field(default=1e-3, metadata=_flag("peak learning rate (AdamW; replaces a DeepSpeed JSON's)"))
    weight_decay: float = field(default=0.0, metadata=_flag("AdamW weight decay (replaces a DeepSpeed JSON's)"))
    warmup_steps: int = field(
        default=0,
        metadata=_flag(
            "linear warmup, then cosine decay to 0.1 x lr over --steps (with --deepspeed: the JSON's scheduler when it "
            "has one)"
        ),
    )
    max_grad_norm: float = field(
        default=1.0, metadata=_flag("gradient clipping by global norm; 0 disables it (DeepSpeed: gradient_clipping)")
    )
    seed: int = field(
        default=0, metadata=_flag("initial weights (identical on every rank), data order, random streams")
    )
    dataset: str | None = field(
        default=None,
        metadata=_flag(
            "a .txt file (documents separated by blank lines), a .jsonl file (input_ids or text per line) or a "
            "datasets.save_to_disk directory (train split); text is tokenised as UTF-8 bytes (vocab 256). Every "
            "document needs 2 tokens or more to be learned from",
            "the bundled corpus",
            metavar="PATH",
        ),
    )
    pack: bool = field(
        default=False,
        metadata=_flag(
            "pack documents into rows; position ids restart at each document and no token attends across a document "
            "boundary"
        ),
    )
    attn: str | None = field(
        default=None,
        metadata=_flag(
            "core attention kernel run over the full sequence",
            "flash_attention_2 on CUDA when flash-attn is installed, else sdpa",
            choices=list(SUPPORTED_ATTENTION),
            metavar="NAME",
        ),
    )
    dtype: str | None = field(
        default=None,
        metadata=_flag(
            "fp32, bf16, fp16 (not on CPU), or torch's names float32, bfloat16, float16. Torch engine: fp32 weights "
            "under autocast; DeepSpeed: its bf16 / fp16 sections",
            "bf16 on CUDA, fp32 on CPU",
            choices=list(DTYPES),
        ),
    )
    device: str | None = field(
        default=None,
        metadata=_flag(
            "cpu or cuda (cuda without a visible GPU is an error); the device detected when absent is used everywhere",
            "cuda when visible, else cpu",
            choices=list(DEVICES),
        ),
    )
    deepspeed: str | None = field(
        default=None,
        metadata=_flag(
            "train with the DeepSpeed engine and this JSON (the flags replace its lr, weight decay, clipping, dtype "
            "and batch keys, and say so); under accelerate launch with distributed_type DEEPSPEED its "
            "deepspeed_config_file is used",
            "off",
            metavar="CONFIG.json",
        ),
    )
    fsdp: bool = field(
        default=False,
        metadata=_flag(
            "train with the FSDP2 engine (torch's fully_shard): parameters, gradients and AdamW state sharded over all "
            "ranks (dp x sp), each decoder layer its own unit, fp32 master weights with --dtype bf16 compute and fp32 "
            "gradient reduction, checkpoints by torch.distributed.checkpoint (docs/entry-points/fsdp2.md)"
        ),
    )
    no_reshard_after_forward: bool = field(
        default=False,
        metadata=_flag(
            "with --fsdp: keep each decoder layer's parameters gathered from its forward to its backward (one "
            "all-gather per layer and step instead of two; the whole model's parameters in memory at the end of "
            "the forward)"
        ),
    )
    grad_ckpt: str = field(
        default="none",
        metadata=_flag(
            "activation checkpointing of the decoder layers: full (also a bare --grad-ckpt), selective (also saves "
            "the attention kernel's and the all-to-alls' outputs), none (docs/memory.md)",
            nargs="?",
            const="full",
            choices=list(POLICIES),
            metavar="POLICY",
        ),
    )
    tiled_mlp: bool = field(
        default=False,
        metadata=_flag(
            "run each decoder layer's MLP over tiles of d (hidden size) tokens, recomputed per tile in the backward"
        ),
    )
    recompute_norms: bool = field(
        default=False,
        metadata=_flag(
            "Llama-style RMSNorms keep only their input for the backward (no fp32 copy), the math in bounded tiles; "
            "with --tiled-mlp the MLP recomputes its input from the norm's (docs/memory.md)"
        ),
    )
    liger_ops: bool = field(
        default=False,
        metadata=_flag(
            "run the Llama-style RMSNorms, SiLU-gated MLPs and rotary embeddings on liger-kernel's fused kernels "
            "(CUDA, liger-kernel installed; other modules keep their torch ops; with --compile only outside the "
            "compiled layers, whose elementwise work Inductor fuses; docs/performance.md)"
        ),
    )
    memory: str | None = field(
        default=None,
        metadata=_flag(
            "auto: choose the cheapest memory features that fit this device from the model's shape, the local "
            "tokens, the engine's sharding and the device's memory (instead of --grad-ckpt, --offload-activations, "
            "--recompute-norms, --tiled-mlp, --head-chunks); logs the plan and its predicted peak, and the measured "
            "one at the end (docs/memory.md)",
            "off",
            choices=["auto"],
            metavar="auto",
        ),
    )
    head_chunks: int = field(
        default=1,
        metadata=_flag(
            "run each attention call's heads in N groups of whole key/value heads, each recomputed in the backward: "
            "the attention's full-sequence tensors exist for one group at a time (not with --grad-ckpt selective; "
            "docs/memory.md)",
            metavar="N",
        ),
    )
    offload_activations: bool = field(
        default=False,
        metadata=_flag(
            "keep each checkpointed layer's input in pinned host memory until its backward (needs --grad-ckpt)"
        ),
    )
    compile: str | None = field(
        default=None,
        metadata=_flag(
            "torch.compile each decoder layer after SP and the memory features, with this backend (a bare "
            "--compile: inductor, which fuses the elementwise work of the forward and the recomputation; "
            "aot_eager checks tracing without code generation); the first step compiles (docs/performance.md)",
            "off",
            nargs="?",
            const="inductor",
            choices=list(COMPILE_BACKENDS),
            metavar="BACKEND",
        ),
    )
    metrics: str | None = field(
        default=None,
        metadata=_flag(
            "rank 0 appends a JSON line per step: step, loss (global token mean), tokens, tok_per_s, "
            "tok_per_s_per_gpu, peak_mem_gb, lr, grad_norm, step_time_s, loss_path (full, liger or tiled: "
            "docs/loss.md), mfu (bf16/fp16 on a known GPU); and per "
            "evaluation: eval_loss, eval_ppl, eval_tokens, eval_batches, eval_time_s",
            "off",
            metavar="FILE",
        ),
    )
    timeout_s: float = field(
        default=600.0,
        metadata=_flag("collective timeout of every process group: a stalled or dead rank fails the job after it"),
    )
    check_identical: bool = field(
        default=False,
        metadata=_flag("verify with a checksum per batch that the ranks of each SP group read the same samples"),
    )
    allow_longer_than_max_positions: bool = field(
        default=False,
        metadata=_flag("allow --seq-len above the model's max_position_embeddings (RoPE models only; warns)"),
    )
    save_dir: str | None = field(
        default=None,
        metadata=_flag(
            "write run checkpoints here, every --save-every steps and at the last step (docs/checkpointing.md)",
            "off",
            metavar="DIR",
        ),
    )
    save_every: int = field(default=0, metadata=_flag("checkpoint every N steps (0: the last step only)", metavar="N"))
    resume: str | None = field(
        default=None,
        metadata=_flag(
            "continue from a --save-dir (its newest complete checkpoint) or one step_* directory of it; another sp "
            "size works (docs/checkpointing.md)",
            "off",
            metavar="DIR",
        ),
    )
    eval_every: int = field(
        default=0,
        metadata=_flag(
            "evaluate on the held-out split every N steps and at the last step (0: never; docs/evaluation.md)",
            metavar="N",
        ),
    )
    eval_batches: int | None = field(
        default=None,
        metadata=_flag(
            "batches per DP replica per evaluation (needs --eval-every)", "the whole held-out split", metavar="K"
        ),
    )
    eval_fraction: float = field(
        default=0.05,
        metadata=_flag("share of documents held out for evaluation, chosen by content hash (with --eval-every)"),
    )

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            check_int(flag(name), getattr(self, name))
        check_int("--seq-len", self.seq_len, minimum=2, note=" (a row needs a next token to learn from)")
        check_int("--seed", self.seed, minimum=0)
        for name in ("warmup_steps", "save_every", "eval_every"):
            check_int(flag(name), getattr(self, name), minimum=0, note=" (0 turns it off)")
        if self.sp_size is not None:
            check_int("--sp-size", self.sp_size)
        if self.ring_size not in (None, "auto") and not (self.ring_size.isdigit() and int(self.ring_size) >= 1):
            raise ValueError(f"--ring-size must be an integer >= 1 or auto, got {self.ring_size!r}")
        for name, allowed in (("dtype", DTYPES), ("device", DEVICES), ("attn", SUPPORTED_ATTENTION)):
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ValueError(f"{flag(name)} must be one of {list(allowed)}, got {value!r}")
        if self.compile is not None and self.compile not in COMPILE_BACKENDS:
            raise ValueError(f"--compile must be one of {list(COMPILE_BACKENDS)}, got {self.compile!r}")
        if self.grad_ckpt not in POLICIES:
            raise ValueError(f"--grad-ckpt must be one of {list(POLICIES)}, got {self.grad_ckpt!r}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError(
                f"--weight-decay and --max-grad-norm must be >= 0 (--max-grad-norm 0 turns clipping "
                f"off), got {self.weight_decay} and {self.max_grad_norm}"
            )
        if not self.timeout_s > 0:
            raise ValueError(
                f"--timeout-s must be > 0 seconds (a collective waiting longer fails the job), got {self.timeout_s}"
            )
        if self.fsdp and self.deepspeed:
            raise ValueError(
                f"--fsdp and --deepspeed {self.deepspeed} name two engines; keep one (both shard parameters, "
                "gradients and optimizer state over all ranks)"
            )
        if self.no_reshard_after_forward and not self.fsdp:
            raise ValueError("--no-reshard-after-forward is an FSDP2 setting: add --fsdp, or leave it out")
        if self.fsdp and self.dtype in ("fp16", "float16"):
            raise ValueError(
                "--fsdp trains in fp32 or bf16: fp16 needs loss scaling, which the FSDP2 engine does not do; "
                "use --dtype bf16 (or --deepspeed with its fp16 loss scaler)"
            )
        if self.memory is not None and self.memory != "auto":
            raise ValueError(f"--memory must be 'auto', got {self.memory!r}")
        chosen = [
            flag(name)
            for name, default in MEMORY_FLAGS.items()
            if getattr(self, name) != default and self.memory == "auto"
        ]
        if chosen:
            raise ValueError(f"--memory auto chooses {', '.join(chosen)} itself; leave them out, or leave out --memory")
        check_int("--head-chunks", self.head_chunks)
        if self.head_chunks > 1 and self.grad_ckpt == "selective":
            raise ValueError(
                f"--head-chunks {self.head_chunks} with --grad-ckpt selective: selective checkpointing saves every "
                "head chunk's all-to-all and kernel outputs until the backward, which head chunks exist to avoid; "
                "use --grad-ckpt full (or none) with --head-chunks, or leave it out"
            )
        if self.offload_activations and self.grad_ckpt == "none":
            raise ValueError(
                "--offload-activations moves the layers' checkpoints to host memory: add --grad-ckpt "
                "(full or selective)"
            )
        if self.save_every and not self.save_dir:
            raise ValueError(f"--save-every {self.save_every} needs --save-dir DIR to write the checkpoints to")
        if self.eval_batches is not None:
            check_int("--eval-batches", self.eval_batches, note=" (leave it out to evaluate the whole held-out split)")
            if not self.eval_every:
                raise ValueError(f"--eval-batches {self.eval_batches} has no effect without --eval-every N")
        if self.eval_every and not 0 < self.eval_fraction < 1:
            raise ValueError(
                f"--eval-fraction must be in (0, 1): the share of documents held out for evaluation, "
                f"got {self.eval_fraction}"
            )

    @classmethod
    def from_mapping(cls, values) -> TrainConfig:
        """A config from a mapping with (at least) every field's name, e.g. ``vars(namespace)``."""
        return cls(**{f.name: values[f.name] for f in fields(cls)})


#: the flags --memory auto sets, with their defaults
MEMORY_FLAGS = {
    "grad_ckpt": "none",
    "offload_activations": False,
    "recompute_norms": False,
    "tiled_mlp": False,
    "head_chunks": 1,
}


def flag(name: str) -> str:
    """The command-line flag of a field: ``seq_len`` -> ``--seq-len``."""
    return "--" + name.replace("_", "-")
