"""Training engines of the run loop: plain torch (torch_engine.py), DeepSpeed (deepspeed_engine.py) or
FSDP2 (fsdp2_engine.py).

All run :func:`ulysses_sp.causal_lm_loss` (the SP group's loss, whose gradients summed over the SP
ranks are P x the reference) and end each optimizer step at the reference gradient:

 - TorchEngine averages gradients over all dp x sp ranks, which divides the P back out;
 - DeepSpeedEngine runs the loss inside the DeepSpeed engine's forward (ZeRO hooks see it) and
   lets DeepSpeed average over all dp x sp ranks too (integrations/deepspeed.py: SPMpu);
 - FSDP2Engine runs it inside the FSDP2 root and reduce-scatters each gradient as a mean over all
   dp x sp ranks (integrations/fsdp2.py).

The interface the loop uses: ``forward_backward(local_batch, num_items)`` returns the micro-batch's
(unscaled) loss; ``step()`` ends the optimizer step and returns the gradient norm; ``loss_sum(local_batch)``
the summed CE of the SP group's sequences for evaluation (under ``torch.no_grad()`` after
``set_train(False)``); ``lr``; ``save(path)`` / ``load(path, ...)`` write and read the engine's part
of a run checkpoint (train/checkpoints.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable

#: the torch engine's file in a checkpoint directory: model, optimizer and scheduler state
TORCH_STATE_FILE = "torch_engine.pt"
#: the DeepSpeed engine's folder in a checkpoint directory, and the tags of its native / universal checkpoint
DEEPSPEED_DIR, NATIVE_TAG, UNIVERSAL_TAG = "deepspeed", "state", "universal"


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """The learning-rate factor of a step: linear warmup over ``warmup`` steps, then a cosine decay to
    0.1 at step ``total``. Every engine uses it, so their curves agree."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor
