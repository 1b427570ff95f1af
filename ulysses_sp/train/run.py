"""The whole job of launch/train.py: the run, and on failure a report naming the rank that failed
(failures.py) and a teardown that does not wait on dead peers.

The flags were checked when the :class:`~.config.TrainConfig` was built, and everything that
depends on the machine or on files is checked by the plan before distributed init (plan.py), so a bad
setting fails on every rank alike and none waits in a collective.
"""

from __future__ import annotations

import gc

from ..core.log import configure_logging
from .config import TrainConfig
from .failures import report_failure, shutdown
from .loop import TrainingRun
from .plan import RunPlan, make_plan


def run(config: TrainConfig) -> None:
    """Train as ``config`` says: the plan (a ValueError here is raised before any process group), then
    :func:`run_plan`."""
    run_plan(make_plan(config))


def run_plan(plan: RunPlan) -> None:
    """Train as ``plan`` says. A failure on any rank ends every rank: a rank's own error is raised as
    it is (after leaving a note for the others), a collective that fails because another rank failed,
    died or stalled raises :class:`~.failures.CollectiveFailure` naming it."""
    configure_logging()
    config = plan.config
    training = None
    failed = True
    try:
        training = TrainingRun.start(plan)
        training.train()
        failed = False
    except BaseException as exc:
        replacement = report_failure(
            exc, training.where if training is not None else "setup", grace_s=min(5.0, config.timeout_s)
        )
        if replacement is exc:
            raise
        raise replacement from exc
    finally:
        if training is not None:
            training.close()
        # the model, its engine and the topology's process groups sit in reference cycles: freed
        # here, while the interpreter is whole, rather than during its finalization, where freeing gloo
        # objects that hold tensors can abort a rank at exit after a successful run (troubleshooting.md)
        training = None
        gc.collect()
        shutdown(failed)
