"""The package's one logger, ``ulysses_sp``, and the rank-aware handler the launcher installs.

Library code only logs; it never adds a handler (an application decides where messages go).
:func:`configure_logging` is what launch/train.py calls: records on standard error, written through
tqdm so a progress bar stays intact; rank 0 writes every record, the other ranks their warnings and
errors only (a rank's own trouble), prefixed with their rank. The rank is the process group's, or
``RANK`` of the launcher's environment before the group exists, so messages of the checks that run
before distributed init are filtered too.
"""

from __future__ import annotations

import logging
import os
import sys

from . import comm

logger = logging.getLogger("ulysses_sp")


def process_rank() -> int:
    """This process's global rank: the process group's, else the launcher's ``RANK``, else 0."""
    return comm.rank() if comm.is_initialized() else int(os.environ.get("RANK", "0"))


class _RankHandler(logging.Handler):
    """Writes every record of rank 0 and the warnings and errors of the others via ``tqdm.write``;
    lines of ranks other than 0 start with their rank."""

    def __init__(self, stream):
        super().__init__()
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        rank = process_rank()
        if rank != 0 and record.levelno < logging.WARNING:
            return
        from tqdm import tqdm

        try:
            message = self.format(record)
            tqdm.write(message if rank == 0 else f"[rank {rank}] {message}", file=self.stream)
        except Exception:  # logging must never raise into the caller
            self.handleError(record)


def configure_logging(level: int = logging.INFO, stream=None) -> None:
    """Send the ``ulysses_sp`` logger's records of ``level`` and above to ``stream`` (standard error):
    all of rank 0's, the warnings and errors of the other ranks. Calling it again replaces the
    handler it installed."""
    for handler in [h for h in logger.handlers if isinstance(h, _RankHandler)]:
        logger.removeHandler(handler)
    handler = _RankHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter("ulysses_sp: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # the launcher owns the output: no second copy through a root handler
