"""What both sides share, so the comparison is like for like: the model (same config, same seeded
random init, built directly on the device), the batch (same random tokens), the engine (DeepSpeed at one
ZeRO stage, or FSDP2) with the same optimizer, precision and clipping.

Shape legend: B batch, S full sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers

from ulysses_sp.train.presets import build_config

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
#: gradient clipping of both engines
GRADIENT_CLIPPING = 1.0


@dataclass(frozen=True)
class Workload:
    """The fixed part of every measured configuration."""

    model: str  # preset name or config path
    layers: int | None  # overrides num_hidden_layers when set
    attn: str  # core attention kernel on both sides
    dtype: torch.dtype
    device: torch.device
    sp: int
    batch_size: int
    zero_stage: int
    lr: float
    engine: str  # "deepspeed" or "fsdp2" (--engine)
    seed: int

    def config(self, attn_implementation: str) -> transformers.PretrainedConfig:
        overrides = {} if self.layers is None else {"num_hidden_layers": self.layers}
        config = build_config(self.model, **overrides)
        config._attn_implementation = attn_implementation
        config.use_cache = False
        return config

    def build_model(self, attn_implementation: str) -> transformers.PreTrainedModel:
        """Seeded random init on the device: both sides get bit-identical weights. DeepSpeed keeps fp32
        master weights itself; under FSDP2 the weights are the fp32 masters, computed in ``dtype``."""
        config = self.config(attn_implementation)
        torch.manual_seed(self.seed)
        weights_dtype = self.dtype if self.engine == "deepspeed" else torch.float32
        with torch.device(self.device):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=weights_dtype)
        return model.to(self.device).train()  # a no-op unless transformers built it elsewhere

    def full_batch(self, seq_len: int, vocab_size: int) -> dict[str, torch.Tensor]:
        """The same [B, S] random tokens on every rank (CPU tensors): input_ids, labels, position_ids."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + seq_len)
        ids = torch.randint(0, vocab_size, (self.batch_size, seq_len), generator=g)
        positions = torch.arange(seq_len).expand(self.batch_size, seq_len).clone()
        return {"input_ids": ids, "labels": ids.clone(), "position_ids": positions}

    def ds_config(self) -> dict:
        """One DeepSpeed config for both sides. torch's AdamW (``torch_adam``): no JIT-built
        FusedAdam on a host without a compiler toolchain, and the same optimizer on both sides."""
        return {
            "train_micro_batch_size_per_gpu": self.batch_size,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": GRADIENT_CLIPPING,
            "bf16": {"enabled": self.dtype == torch.bfloat16},
            "zero_optimization": {"stage": self.zero_stage},
            "optimizer": {"type": "AdamW", "params": {"lr": self.lr, "weight_decay": 0.0, "torch_adam": True}},
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
