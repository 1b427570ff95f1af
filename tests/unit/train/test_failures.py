"""Failure reports: which errors are a peer's, and what a rank says about who failed first."""

from __future__ import annotations

from ulysses_sp.train import failures


def test_failure_reports():
    gloo_closed = RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:5. This is typically caused")
    assert failures.is_collective_error(gloo_closed)
    assert failures.is_collective_error(RuntimeError("[unbound_buffer.cc:78] Timed out waiting 5000ms for recv"))
    assert not failures.is_collective_error(ValueError("bad input"))
    bad = ValueError("bad")
    assert failures.report_failure(bad, "step 3") is bad  # no process group: returned as is
    origin = failures._explain(0, "step 4", gloo_closed, {1: ("origin", "step 4", "OSError: disk full")}, 3, True)
    assert "The job stopped because rank 1 failed at step 4: OSError: disk full" in origin
    silent = failures._explain(0, "step 4", gloo_closed, {2: ("collective", "step 4", "RuntimeError: x")}, 3, True)
    assert "rank(s) [1] stayed silent" in silent and "Ranks [2] saw a failed collective too" in silent
    unreachable = failures._explain(1, "setup", gloo_closed, {}, 2, False)
    assert "store could not be reached" in unreachable
