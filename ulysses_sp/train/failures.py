"""When one rank fails, every rank exits, and the logs say which rank failed first and how.

Three ways a distributed job fails, and what the other ranks see:

* a rank **raises** (bad data on one node, a bug): it leaves a note in the job's key-value store
  (the rendezvous store every rank already shares), tears down its process group and exits; the
  others' next collective fails ("connection closed" on gloo) or times out;
* a rank **dies** (OOM killer, a signal): its connections close; the others' collectives fail;
* a rank **stalls** (a hung kernel, a deadlock): the others' collectives time out after the
  collective timeout (``--timeout-s``, applied to every process group, see :mod:`ulysses_sp.core.topology`).

A rank whose collective failed leaves a note too, then waits a few seconds for the notes of the
others and raises :class:`CollectiveFailure` naming the rank(s) that failed first with their error,
or, when none left a note, the ranks that stayed silent (died or stalled). The store is reached with
a short timeout: if it died with its host, the message says so instead.
"""

from __future__ import annotations

import time
from datetime import timedelta

from ..core import comm
from ..core.log import logger

_PREFIX = "ulysses_sp/failed/"
#: substrings of the errors gloo / NCCL / c10d raise when a collective cannot complete
_COLLECTIVE_MARKERS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Timed out waiting",
    "timed out",
    "Watchdog caught collective operation timeout",
    "NCCL error",
    "ncclRemoteError",
    "ProcessGroupGloo",
    "ProcessGroupNCCL",
    "Broken pipe",
    "Socket Timeout",
)


class CollectiveFailure(RuntimeError):
    """A collective could not complete because another rank failed, died or stalled."""


def is_collective_error(exc: BaseException) -> bool:
    """True for the errors a collective raises when a peer is gone or late (not for errors of this rank)."""
    if isinstance(exc, (CollectiveFailure, comm.DistError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _COLLECTIVE_MARKERS)


def _summary(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:500]


def report_failure(exc: BaseException, where: str, *, grace_s: float = 5.0) -> BaseException:
    """Record this rank's failure and return the exception to raise in its place.

    ``where`` says what the rank was doing ("setup", "step 4"). An error of this rank comes back
    unchanged (its traceback is the useful one). A failed collective comes back as a
    :class:`CollectiveFailure` naming the rank(s) that failed first, after waiting up to ``grace_s``
    seconds for their notes.
    """
    if not comm.is_initialized():
        return exc
    rank, world = comm.rank(), comm.world_size()
    victim = is_collective_error(exc)
    store = comm.job_store(timedelta(seconds=min(grace_s, 5.0)))  # None: it died with its host
    note = f"{'collective' if victim else 'origin'}|{where}|{_summary(exc)}"
    if store is not None:
        try:
            store.set(f"{_PREFIX}{rank}", note)
        except (RuntimeError, OSError):
            store = None
    if not victim:
        return exc
    notes = _collect_notes(store, rank, world, grace_s)
    return CollectiveFailure(_explain(rank, where, exc, notes, world, store is not None))


def _collect_notes(store, rank: int, world: int, grace_s: float) -> dict[int, tuple[str, str, str]]:
    """The other ranks' notes, waiting up to ``grace_s`` for an origin or for every rank."""
    notes: dict[int, tuple[str, str, str]] = {}
    if store is None:
        return notes
    deadline = time.monotonic() + grace_s
    while True:
        for r in range(world):
            if r == rank or r in notes:
                continue
            try:
                if store.check([f"{_PREFIX}{r}"]):
                    kind, where, summary = store.get(f"{_PREFIX}{r}").decode().split("|", 2)
                    notes[r] = (kind, where, summary)
            except (RuntimeError, OSError, ValueError):
                return notes
        origins = any(kind == "origin" for kind, _, _ in notes.values())
        if origins or len(notes) == world - 1 or time.monotonic() >= deadline:
            return notes
        time.sleep(0.2)


def _explain(rank: int, where: str, exc: BaseException, notes: dict, world: int, reachable: bool) -> str:
    head = f"rank {rank}: a collective failed at {where} ({_summary(exc)})."
    origins = {r: n for r, n in notes.items() if n[0] == "origin"}
    if origins:
        first = "; ".join(f"rank {r} failed at {w}: {s}" for r, (_, w, s) in sorted(origins.items()))
        return f"{head} The job stopped because {first}. See that rank's traceback for the cause."
    if not reachable:
        return (
            f"{head} The job's store could not be reached to learn which rank failed (its host, rank 0 "
            f"without torchrun, may be the one that died). Look for the first error in the other ranks' logs."
        )
    silent = sorted(set(range(world)) - set(notes) - {rank})
    seen = f" Ranks {sorted(notes)} saw a failed collective too." if notes else ""
    return (
        f"{head} No rank reported an error of its own: rank(s) {silent} stayed silent, i.e. were killed "
        f"(out of memory, a signal), crashed hard, or are stalled (a hung kernel, a deadlock).{seen} The "
        f"collective timeout (--timeout-s) bounds how long a stalled rank holds up the others."
    )


def shutdown(failed: bool) -> None:
    """Tear down the process groups without waiting on peers that are gone.

    After a failure, NCCL communicators may still hold collectives that will never complete:
    destroying them waits, aborting does not. gloo's teardown does not wait. After success every
    rank first meets the others in a barrier: a rank that destroyed its group while a peer still had
    a collective in flight aborted that peer's process at exit ("terminate called without an active
    exception", seen under load on CPU after all steps had finished).
    """
    if not comm.is_initialized():
        return
    try:
        if failed and "nccl" in comm.backend():
            comm.abort_world()
        else:
            if not failed:
                comm.barrier()
            comm.destroy_world()
    except (RuntimeError, OSError, ValueError) as e:  # the job ends with the original error: do not mask it
        logger.warning("process group teardown failed (%s: %s)", type(e).__name__, e)
