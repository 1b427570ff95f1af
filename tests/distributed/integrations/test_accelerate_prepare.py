"""prepare_sp + train_step with a real Accelerator (MULTI_CPU: DDP over gloo) against one non-SP
process running the whole step: after every optimizer step (SGD, so the update is the gradient)
every weight equals the reference's, and the returned loss is the step's global token mean.
dp2 x sp2 with Accelerate's gradient_accumulation_steps=2 (whose loss division train_step undoes),
shuffled batches (Accelerate's RNG sync must give the SP group identical samples: the checksum
check would raise otherwise) and rows no sp size divides, with masked labels. In the same processes,
hybrid SP from an Accelerate config: ``parallelism_config_cp_size: 2`` next to ``sp_size: 1`` and
``sp_backend: ulysses_sp`` (the environment ``accelerate launch`` writes) is dp2 x (u, r) = (1, 2)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from tests.distributed import harness
from tests.helpers import tiny_model, tokens
from ulysses_sp.core import comm
from ulysses_sp.data.collate import collate_padded
from ulysses_sp.integrations.accelerate import prepare_sp, train_step
from ulysses_sp.integrations.accelerate_env import claim_sp_size

pytestmark = harness.cpu_only(
    "Accelerate's cpu=True process group (the GPU path is plain DDP, covered by the other bodies)"
)

MICRO, BATCH, STEPS, LR = 2, 2, 2, 0.5


def _dataset(n: int = 16) -> list[dict]:
    rows = []
    for i in range(n):
        ids = tokens(1, 13 + (7 * i) % 17, seed=100 + i)[0]  # 13..29 tokens
        labels = ids.clone()
        labels[: i % 5] = -100  # a prompt of 0..4 tokens
        rows.append({"input_ids": ids, "labels": labels})
    return rows


class RecordingCollate:
    """collate_padded that keeps every full batch it made (the reference replays them)."""

    def __init__(self):
        self.seen: list[dict] = []

    def __call__(self, samples):
        batch = collate_padded(samples)
        self.seen.append({k: v.clone() for k, v in batch.items()})
        return batch


def _reference_step(model, optimizer, batches) -> float:
    """One non-SP process over every micro-batch of every DP replica: sum(CE) / N, SGD."""
    n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    total = 0.0
    for b in batches:
        loss = model(input_ids=b["input_ids"], labels=b["labels"], num_items_in_batch=n).loss
        loss.backward()
        total += float(loss.detach())
    optimizer.step()
    optimizer.zero_grad()
    return total


#: what ``accelerate launch`` writes for a parallelism_config of a ring of 2 single-rank Ulysses groups
HYBRID_ENV = {
    "ACCELERATE_USE_PARALLELISM_CONFIG": "true",
    "PARALLELISM_CONFIG_SP_SIZE": "1",
    "PARALLELISM_CONFIG_CP_SIZE": "2",
    "PARALLELISM_CONFIG_SP_BACKEND": "ulysses_sp",
}


def _body(ctx):
    _prepare_sp_matches_reference(ctx, 2, (2, 1))
    os.environ.update(HYBRID_ENV)
    assert claim_sp_size() == 2  # before Accelerator(), whose ParallelismConfig would refuse our backend
    _prepare_sp_matches_reference(ctx, None, (2, 2))


def _prepare_sp_matches_reference(ctx, sp_size: int | None, sizes: tuple[int, int]):
    """``sizes``: the (sp, ring) sizes prepare_sp must arrive at."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", OMP_NUM_THREADS="1")
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=MICRO)
    set_seed(7)  # the same streams on every rank: identical shuffles inside each SP group
    model, ref = tiny_model("tiny-llama", seed=3), tiny_model("tiny-llama", seed=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    ref_optimizer = torch.optim.SGD(ref.parameters(), lr=LR)
    collate = RecordingCollate()
    loader = DataLoader(_dataset(), batch_size=BATCH, shuffle=True, collate_fn=collate)
    topo, sp_model, optimizer, sp_loader = prepare_sp(accelerator, model, optimizer, loader, sp_size=sp_size)
    sp_size = topo.sp_size
    assert (topo.sp_size, topo.ring_size, topo.dp_size) == (*sizes, ctx.world_size // sizes[0])
    assert len(sp_loader) == 16 // BATCH // topo.dp_size

    batches = iter(sp_loader)
    for step in range(STEPS):
        micro = [next(batches) for _ in range(MICRO)]
        loss = train_step(accelerator, sp_model, optimizer, micro, topo)
        mine = collate.seen[step * MICRO : (step + 1) * MICRO]  # Accelerate's loader reads one batch ahead
        everyone = comm.all_gather_object(mine, dist.group.WORLD)
        step_batches = [b for d in range(topo.dp_size) for b in everyone[d * sp_size]]  # one rank per SP group
        ref_loss = _reference_step(ref, ref_optimizer, step_batches)
        assert abs(float(loss) - ref_loss) <= 1e-5 * abs(ref_loss), (step, float(loss), ref_loss)
        trained = accelerator.unwrap_model(sp_model).model
        for (name, p), q in zip(trained.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=2e-6, msg=f"step {step}: {name}")


def test_prepare_sp_dp2_sp2_and_dp2_ring2_match_reference():
    harness.run(_body, 4)
