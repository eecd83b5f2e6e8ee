"""The command a benchmark records (benchmarks/command_line.py) reproduces its run: the
script relative to the repository, every argument quoted, the niceness it ran at."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "command_line.py"
ARGS = ["--run", "a=dir with space", "--n=3", "--name", "it's", "--models", "x", "y", ""]


def recorded(script: str, args: list[str], cwd: Path, nice: int = 0) -> str:
    """The command ``python SCRIPT ARGS`` records, run in ``cwd`` ``nice`` steps nicer."""
    return subprocess.run(
        [sys.executable, script, *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
        preexec_fn=(lambda: os.nice(nice)) if nice else None,
    ).stdout.rstrip("\n")


def test_the_recorded_command_round_trips_from_another_directory(tmp_path):
    command = recorded(str(SCRIPT), ARGS, cwd=tmp_path)  # absolute path, run elsewhere
    niceness = os.nice(0)  # the child's, inherited
    prefix = ["nice", "-n", str(niceness)] if niceness else []
    assert shlex.split(command) == [*prefix, "python", "benchmarks/command_line.py", *ARGS]


def test_a_relative_path_and_the_niceness_are_recorded():
    command = recorded("benchmarks/command_line.py", ["--n", "5"], REPO, nice=3)
    niceness = min(os.nice(0) + 3, 19)
    assert command == f"nice -n {niceness} python benchmarks/command_line.py --n 5"
