"""The ``vaebm`` console script's entry point.

It imports nothing heavy itself. Loading the command line pulls in torch and numpy, about a
second and a half, and a KeyboardInterrupt raised inside their imports comes out as an
ImportError with numpy's advice on broken installs. So Ctrl-C is held while the command line
loads and answered once it has: one line and exit code 130, as it is later in a command.
"""

from __future__ import annotations

import signal
import sys

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a process Ctrl-C ended
INTERRUPTED_BEFORE_START = "vaebm: interrupted before the command started; nothing was done"


def main() -> int:
    interrupted: list[int] = []
    held = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if held:  # an ignored SIGINT (a background job) stays ignored
        signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    try:
        from training.cli import main as run_command_line
    finally:
        if held:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    if interrupted:
        print(INTERRUPTED_BEFORE_START, file=sys.stderr)
        return EXIT_INTERRUPTED
    return run_command_line()
