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

DTYPES = ("fp32", "bf16", "fp16")
DEVICES = ("cpu", "cuda")


def _flag(help_text: str, **argparse_kwargs) -> dict:
    """Field metadata: the flag's help and its extra argparse options."""
    return {"help": help_text, "argparse": argparse_kwargs}


@dataclass(frozen=True)
class TrainConfig:
    """launch/train.py's flags (``--seq-len`` is ``seq_len``); see docs/configuration.md."""

    sp_size: int | None = field(
        default=None,
        metadata=_flag(
            "SP group size (default: the DeepSpeed JSON's sequence_parallel_size, else the Accelerate config's, else 1)"
        ),
    )
    model: str = field(default="tiny-llama", metadata=_flag("preset name or a local config.json / model directory"))
    seq_len: int = field(default=256, metadata=_flag("tokens per row"))
    batch_size: int = field(default=1, metadata=_flag("sequences per micro-batch per DP replica"))
    grad_accum: int = field(default=1, metadata=_flag("micro-batches per optimizer step"))
    steps: int = field(default=10, metadata=_flag("optimizer steps"))
    lr: float = field(default=1e-3, metadata=_flag("peak learning rate"))
    weight_decay: float = field(default=0.0, metadata=_flag("AdamW weight decay"))
    warmup_steps: int = field(default=0, metadata=_flag("linear warmup steps before the cosine decay"))
    max_grad_norm: float = field(default=1.0, metadata=_flag("gradient clipping norm; 0 disables clipping"))
    seed: int = field(default=0, metadata=_flag("seed of the weights, the data order and the random streams"))
    dataset: str | None = field(
        default=None,
        metadata=_flag("default: the bundled corpus; or a .txt file, a .jsonl file or a datasets directory"),
    )
    pack: bool = field(default=False, metadata=_flag("pack documents into rows (positions reset per document)"))
    attn: str | None = field(
        default=None,
        metadata=_flag(
            "core attention kernel (default: flash_attention_2 on CUDA when installed, else sdpa)",
            choices=list(SUPPORTED_ATTENTION),
        ),
    )
    dtype: str | None = field(default=None, metadata=_flag("default: bf16 on CUDA, fp32 on CPU", choices=list(DTYPES)))
    device: str | None = field(
        default=None, metadata=_flag("default: cuda when visible, else cpu", choices=list(DEVICES))
    )
    deepspeed: str | None = field(
        default=None,
        metadata=_flag(
            "train with DeepSpeed (ZeRO config); under accelerate launch with distributed_type DEEPSPEED: its "
            "deepspeed_config_file",
            metavar="CONFIG.json",
        ),
    )
    grad_ckpt: str = field(
        default="none",
        metadata=_flag(
            "activation checkpointing of the decoder layers; bare --grad-ckpt: full; selective also saves the "
            "attention and all-to-all outputs (docs/memory.md)",
            nargs="?",
            const="full",
            choices=list(POLICIES),
        ),
    )
    tiled_mlp: bool = field(default=False, metadata=_flag("run each decoder layer's MLP over token tiles"))
    recompute_norms: bool = field(
        default=False, metadata=_flag("RMSNorms keep only their input for the backward (no fp32 copy; docs/memory.md)")
    )
    offload_activations: bool = field(
        default=False,
        metadata=_flag("keep the layers' checkpoints in host memory (needs --grad-ckpt full or selective)"),
    )
    metrics: str | None = field(default=None, metadata=_flag("append JSON lines per step", metavar="FILE"))
    timeout_s: float = field(
        default=600.0,
        metadata=_flag("collective timeout of every process group: a stalled or dead rank fails the job after it"),
    )
    check_identical: bool = field(default=False, metadata=_flag("verify the SP group reads identical samples"))
    allow_longer_than_max_positions: bool = field(
        default=False, metadata=_flag("allow --seq-len above the model's max_position_embeddings (RoPE models only)")
    )
    save_dir: str | None = field(
        default=None, metadata=_flag("write checkpoints here (and at the last step)", metavar="DIR")
    )
    save_every: int = field(default=0, metadata=_flag("checkpoint every N steps (0: last only)", metavar="N"))
    resume: str | None = field(
        default=None,
        metadata=_flag(
            "continue from a --save-dir (its newest checkpoint) or one step_* directory of it", metavar="DIR"
        ),
    )
    eval_every: int = field(
        default=0,
        metadata=_flag("evaluate on the held-out split every N steps and at the last step (0: never)", metavar="N"),
    )
    eval_batches: int | None = field(
        default=None,
        metadata=_flag("batches per DP replica per evaluation (default: the whole held-out split)", metavar="K"),
    )
    eval_fraction: float = field(
        default=0.05,
        metadata=_flag("share of documents held out for evaluation, chosen by content hash (with --eval-every)"),
    )

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "seq_len"):
            check_int(flag(name), getattr(self, name))
        check_int("--seed", self.seed, minimum=0)
        for name in ("warmup_steps", "save_every", "eval_every"):
            check_int(flag(name), getattr(self, name), minimum=0, note=" (0 turns it off)")
        if self.sp_size is not None:
            check_int("--sp-size", self.sp_size)
        for name, allowed in (("dtype", DTYPES), ("device", DEVICES), ("attn", SUPPORTED_ATTENTION)):
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ValueError(f"{flag(name)} must be one of {list(allowed)}, got {value!r}")
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


def flag(name: str) -> str:
    """The command-line flag of a field: ``seq_len`` -> ``--seq-len``."""
    return "--" + name.replace("_", "-")
