"""The command line that ran the current benchmark, as recorded in its results.

Every benchmark that writes a ``"command"`` field takes it from :func:`this_command`, so
the field reproduces the run, flags and all, when typed at the repository root.
Printing it is a quick check of what a script would record:

    nice -n 19 python benchmarks/command_line.py --n 5 --run 'a=dir with space'
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def this_command() -> str:
    """``python benchmarks/NAME.py ARGS...`` for the running script, as typed at the
    repository root: the arguments quoted by ``shlex.join``, the script's path relative to
    the repository when it lies inside it (whatever the working directory or however the
    path was given), and a ``nice -n N`` prefix when the process runs at niceness N != 0."""
    script = Path(sys.argv[0])
    try:
        shown = script.resolve().relative_to(REPO).as_posix()
    except ValueError:  # outside the repository: as given
        shown = str(script)
    niceness = os.nice(0)
    prefix = ["nice", "-n", str(niceness)] if niceness else []
    return shlex.join([*prefix, "python", shown, *sys.argv[1:]])


if __name__ == "__main__":
    print(this_command())
