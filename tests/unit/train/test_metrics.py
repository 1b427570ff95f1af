"""What the run reports: the progress bar's moving-average tok/s and the run totals."""

from __future__ import annotations

import pytest
import torch

from ulysses_sp.train import flops
from ulysses_sp.train.metrics import Throughput


def test_throughput_is_a_moving_average_and_a_total():
    t = Throughput(window=2)
    t.add(100, 1.0, 10.0)
    assert t.recent_tok_per_s == pytest.approx(100.0)
    t.add(1000, 1.0, 20.0)
    t.add(2000, 2.0, 30.0)  # the first step leaves the window
    assert t.recent_tok_per_s == pytest.approx(1000.0)  # (1000 + 2000) / (1 + 2)
    assert (t.steps, t.tokens, t.seconds) == (3, 3100, 4.0)


def test_packed_rows_count_attention_within_documents():
    shape = flops.ModelShape(matmul_params=1000, layers=2, q_heads=4, qk_head_dim=8, v_head_dim=8)
    whole = flops.step_flops(shape, 16, 2)  # two rows of one document each
    assert flops.document_step_flops(shape, 32, torch.tensor([16, 16])) == pytest.approx(whole)
    packed = flops.document_step_flops(shape, 32, torch.tensor([4, 12, 16]))
    assert packed < whole and packed - 6 * 1000 * 32 == pytest.approx(
        flops.attention_flops(shape, 4) + flops.attention_flops(shape, 12) + flops.attention_flops(shape, 16)
    )


def test_the_summary_rates_are_the_median_step():
    t = Throughput()
    t.add(100, 10.0, 1.0)  # a warm-up step
    t.add(100, 1.0, 2.0)
    t.add(100, 0.5, 3.0)
    assert t.median_rates() == (100.0, 2.0)
