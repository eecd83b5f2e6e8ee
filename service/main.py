"""``serve()``: run the scoring service under uvicorn (``vaebm serve``, ``python -m service``).

Exit status: 0 after a clean shutdown (SIGTERM or SIGINT: uvicorn stops accepting
connections and finishes in-flight requests first), 2 for invalid configuration, 3 when
the model cannot be loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Collection, Iterator
from pathlib import Path
from types import FrameType
from typing import NoReturn

import uvicorn
from pydantic import ValidationError
from pydantic_settings import SettingsError

from service.app import create_app
from service.cancellation import ShutdownDeadline
from service.logs import configure_logging
from service.settings import ENV_PREFIX, Settings

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_BAD_CONFIG = 2
EXIT_STARTUP_FAILED = 3


FLAGS = ("host", "port", "checkpoint", "device")  # settings the command line may override


class _OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line with a pointer to --help (not the usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_CONFIG, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="vaebm serve",
        description=(
            f"Serve OOD scores over HTTP. Every setting comes from {ENV_PREFIX}* environment "
            "variables; these flags override the four most common ones."
        ),
    )
    parser.add_argument("--host", help=f"bind address ({ENV_PREFIX}HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help=f"TCP port ({ENV_PREFIX}PORT, default 8000)")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help=f"checkpoint directory ({ENV_PREFIX}CHECKPOINT, default checkpoints/fashion-mnist)",
    )
    parser.add_argument("--device", help=f"auto, cpu, cuda or cuda:N ({ENV_PREFIX}DEVICE)")
    return parser


def describe_validation_error(exc: ValidationError, from_flags: Collection[str] = ()) -> str:
    """One line per bad setting, named as the user gave it: the flag for ``from_flags``,
    else its environment variable (values not echoed)."""
    lines = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else "?"
        name = f"--{field}" if field in from_flags else f"{ENV_PREFIX}{field.upper()}"
        lines.append(f"{name}: {err['msg']}")
    return "; ".join(lines)


class BadSettings(ValueError):
    """Settings that do not validate; the message names each one as the user gave it."""


def load_settings(argv: list[str] | None) -> Settings:
    """Settings from the environment, overridden by the command-line flags."""
    if argv and argv[0] == "--":  # `vaebm serve -- --port 9000`: the separator is not ours
        argv = argv[1:]
    ns = build_parser().parse_args(argv)
    overrides = {key: value for key, value in vars(ns).items() if value is not None}
    try:
        return Settings(**{key: overrides[key] for key in FLAGS if key in overrides})
    except ValidationError as exc:
        raise BadSettings(describe_validation_error(exc, overrides)) from exc


def serve(argv: list[str] | None = None) -> int:
    """Run the service until SIGTERM/SIGINT; returns the process exit status."""
    try:
        settings = load_settings(argv)
    except BadSettings as exc:
        configure_logging()
        logger.error("invalid configuration: %s", exc)
        return EXIT_BAD_CONFIG
    except SettingsError as exc:  # a VAEBM_* value that must be JSON and is not
        configure_logging()
        cause = f": {exc.__cause__}" if exc.__cause__ else ""
        logger.error("invalid configuration: %s%s", exc, cause)
        return EXIT_BAD_CONFIG
    configure_logging(settings.log_level, json_lines=settings.log_json)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        lifespan="on",
        log_config=None,  # our handler, set up above
        access_log=False,  # RequestContextMiddleware logs every request with its id
        # uvicorn takes whole seconds, and 0 as "wait forever": round up, never to 0
        timeout_graceful_shutdown=math.ceil(settings.graceful_timeout_s),
        server_header=False,
    )
    server = _Server(config)
    app.state.draining = ShutdownDeadline(
        lambda: server.exit_requested_at, settings.graceful_timeout_s
    )
    with _absorb_reraised_signals():
        try:
            server.run()
        except SystemExit as exc:  # uvicorn exits by itself when the lifespan fails
            if exc.code not in (None, 0) and server.started:
                raise
    if not server.started:
        logger.error(
            "the service did not start: %s", app.state.startup_error or "see the errors above"
        )
        return EXIT_STARTUP_FAILED
    logger.info("shut down cleanly")
    return EXIT_OK


class _Server(uvicorn.Server):
    """uvicorn's server, noting when SIGTERM or SIGINT asked it to stop: the shutdown's
    grace period runs from about then (ShutdownDeadline's clock starts there, not at the
    first check of some long work, which may come a step later)."""

    exit_requested_at: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.exit_requested_at is None:
            self.exit_requested_at = time.monotonic()
        super().handle_exit(sig, frame)


@contextlib.contextmanager
def _absorb_reraised_signals() -> Iterator[None]:
    """Keep SIGTERM/SIGINT from killing the process after uvicorn's graceful shutdown.

    uvicorn handles the signals itself while it runs, then re-raises them to the handlers
    that were installed before; those handlers are these no-ops, so ``serve`` returns its
    exit status instead of dying by the signal.
    """
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: None)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
