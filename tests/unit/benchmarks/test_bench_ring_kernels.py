"""benchmarks/bench_ring_kernels.py on CPU, tiny: one JSON row per kernel, a time for the torch
kernel (the ring's autograd Function at ring size 1, forward + backward on packed, windowed
documents), and a kernel that cannot run here reported as an error row, not a crash."""

from __future__ import annotations

import json

from benchmarks import bench_ring_kernels


def test_rows_per_kernel(tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    argv = "--seq-len 64 --heads 2 --kv-heads 1 --head-dim 8 --docs 3 --window 9 --steps 1 --device cpu"
    bench_ring_kernels.main([*argv.split(), "--kernels", "sdpa,flex_attention", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["kernel"] for r in rows] == ["sdpa", "flex_attention"]
    assert rows[0]["ms"] > 0 and rows[0]["vs_torch_kernel"] == 1.0 and (rows[0]["docs"], rows[0]["window"]) == (3, 9)
    assert rows[1]["error"].startswith("ValueError: flex_attention has no backward on CPU")
    assert capsys.readouterr().out.count("\n") == 2
