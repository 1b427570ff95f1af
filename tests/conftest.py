"""Session setup for every test: a private directory for JIT-built torch extensions."""

from __future__ import annotations

import os
import shutil
import tempfile

_OWN_EXTENSIONS_DIR: str | None = None


def pytest_configure(config) -> None:
    # DeepSpeed on CPU JIT-builds its shm all-reduce op into TORCH_EXTENSIONS_DIR (~/.cache by default)
    # under a lock file that a build killed midway never removes; every later run on that machine then
    # waits on it forever. A directory of the session's own keeps such state out (one ~30 s build per
    # session); a TORCH_EXTENSIONS_DIR set by the user is kept. Spawned ranks and launched subprocesses
    # inherit it through the environment.
    global _OWN_EXTENSIONS_DIR
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        _OWN_EXTENSIONS_DIR = tempfile.mkdtemp(prefix="ulysses_sp_torch_extensions_")
        os.environ["TORCH_EXTENSIONS_DIR"] = _OWN_EXTENSIONS_DIR


def pytest_unconfigure(config) -> None:
    global _OWN_EXTENSIONS_DIR
    if _OWN_EXTENSIONS_DIR is not None:
        os.environ.pop("TORCH_EXTENSIONS_DIR", None)
        shutil.rmtree(_OWN_EXTENSIONS_DIR, ignore_errors=True)
        _OWN_EXTENSIONS_DIR = None
