"""benchmarks/spbench/sites.py: the names it gives allocations, the summary at the peak, growth per token.

The mode reads device memory through an allocator object; on CPU a fake one stands in for CUDA's
(its counters are set by the test), the dispatcher and autograd are the real ones.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from benchmarks.spbench import sites


class _Allocator:
    """Fake allocator: ``allocated`` and ``blocks`` as the test sets them."""

    track = None
    resolution = sites.RESOLUTION

    def __init__(self, blocks=None):
        self.blocks, self.now = dict(blocks or {}), 0

    def allocated(self) -> int:
        return self.now

    def reset_peak(self) -> None:
        pass

    def peak(self) -> int:
        return self.now

    def live_blocks(self) -> dict[int, int]:
        return dict(self.blocks)


class _Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([_Layer(), _Layer()])

    def forward(self, x):
        for layer in self.layers:
            x = checkpoint(layer, x, use_reentrant=False)
        return x


class _EveryName(sites.SiteMode):
    """Keeps every name given, also those whose storage was freed and its address reused."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        self.names = getattr(self, "names", set()) | {name for name, _ in self.maker.values()}
        return out


def test_names_say_phase_module_op_and_token_dimension():
    torch.manual_seed(0)
    model, x = _Model(), torch.randn(5, 8, requires_grad=True)
    with sites.module_scope(model) as scope, _EveryName(_Allocator(), torch.device("cpu"), 5, scope) as mode:
        model(x).square().sum().backward()
    names = mode.names
    assert "fwd layers.*.up aten.addmm [s, 16] fp32" in names
    assert "rec layers.*.up aten.addmm [s, 16] fp32" in names  # the checkpoint's recomputation
    assert "bwd GeluBackward0 aten.gelu_backward [s, 16] fp32" in names
    assert "bwd AddmmBackward0 aten.mm [16, 8] fp32" in names  # a weight gradient: no token dimension
    assert not any(" aten.t " in n or " aten.view " in n for n in names)  # views make no storage
    assert scope == []


def test_summary_sums_live_blocks_by_name_at_the_highest_allocation():
    before = {1: 100}
    allocator = _Allocator(before)
    with sites.SiteMode(allocator, torch.device("cpu"), 4, []) as mode:
        a = torch.ones(4, 3)
        b = torch.ones(4, 3)
        allocator.now = sites.RESOLUTION  # the next op reaches the maximum: its blocks are read
        allocator.blocks = {1: 100, a.data_ptr(): 48, b.data_ptr(): 48 + (8 << 20), 7: 5}  # b's block: reused
        a.add_(1)  # in place: a keeps its maker's name
        allocator.now = sites.RESOLUTION // 2  # lower: the blocks at the maximum stay
        allocator.blocks = {}
        torch.zeros(2)
    summary = mode.summary()
    assert summary["state_peak_bytes"] == sites.RESOLUTION
    assert summary["sites"] == [
        {
            "site": "unlabelled (last named there: fwd model aten.ones [s, 3] fp32)",
            "bytes": 48 + (8 << 20),
            "blocks": 1,
        },
        {"site": "before the step", "bytes": 100, "blocks": 1},
        {"site": "fwd model aten.ones [s, 3] fp32", "bytes": 48, "blocks": 1},
        {"site": "unlabelled", "bytes": 5, "blocks": 1},
    ]


def test_slopes_per_site_between_the_shortest_and_longest_length():
    def run(tokens, sites_, status="ok"):
        peak = sum(b for _, b in sites_)
        return {
            "config": "ours+x",
            "status": status,
            "memory_sites": {
                "tokens": tokens,
                "state_peak_bytes": peak,
                "peak_inside_op_bytes": peak + 10,
                "sites": [{"site": s, "bytes": b, "blocks": 1} for s, b in sites_],
            },
        }

    runs = [
        run(100, [("static", 1000), ("q", 200)]),
        run(300, [("static", 1000), ("q", 600), ("dq", 400)]),
        run(500, [("static", 0)], status="oom"),
    ]
    (slope,) = sites.slopes(runs)
    assert slope["tokens"] == [100, 300]
    assert slope["state_peak_bytes_per_token"] == (2000 - 1200) / 200
    assert slope["sites"] == [  # largest first, ties by name
        {"site": "dq", "bytes_per_token": 2.0},
        {"site": "q", "bytes_per_token": 2.0},
        {"site": "static", "bytes_per_token": 0.0},
    ]


def test_shape_label_names_the_token_dimension():
    assert sites.shape_label(torch.Size([1, 32, 65536, 128]), 65536) == "[1, 32, s, 128]"
    assert sites.shape_label(torch.Size([1, 1]), 1) == "[1, 1]"


def test_tracking_allocator_counts_storages_while_they_hold_memory():
    allocator = sites.TrackingAllocator()
    kept, freed, emptied = torch.ones(100), torch.ones(50), torch.ones(25)
    for t in (kept, freed, emptied):
        allocator.track(t.untyped_storage())
    assert allocator.allocated() == 4 * 175
    del freed
    emptied.untyped_storage().resize_(0)  # FSDP2 frees gathered parameters so: the storage outlives its memory
    assert allocator.live_blocks() == {kept.data_ptr(): 400}
