"""The README's two fresh-machine commands: torch's CPU build first, and the test command is what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

from tests.helpers import ROOT

CPU_TORCH = "pip install torch --index-url https://download.pytorch.org/whl/cpu && "


def _commands() -> list[str]:
    readme = (Path(ROOT) / "README.md").read_text()
    section = readme.split("## Fresh machine: two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_fresh_machine_commands_install_the_cpu_torch_and_ci_runs_the_test_command():
    main_job, tests = _commands()
    assert main_job.startswith(CPU_TORCH) and "torchrun --nproc_per_node 2 launch/train.py --sp-size 2" in main_job
    assert tests.startswith(CPU_TORCH)
    install, run = tests[len(CPU_TORCH) :].split(" && ", 1)
    ci = (Path(ROOT) / ".ci" / "run").read_text().strip().splitlines()
    assert install == "pip install -e '.[test]'"
    suite = ci.index(f"python -m pip install -q -e '.[test]' && {run}")  # README's command, verbatim
    assert any(line.startswith("python -m pytest -q tests/unit") for line in ci[suite + 1 :])  # lower bound
    assert "python -m pip install -q torch==2.13.0" in ci  # the CPU wheel CI's machine holds, never a CUDA build
