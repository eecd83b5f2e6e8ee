"""Structured logging: one JSON object per line, with the request id of the current request.

The request id lives in a context variable set by the request middleware, so every log
line written while a request is handled (in the route, the batcher callback or a worker
thread started with the context) carries it.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "vaebm_request_id", default=None
)

# LogRecord attributes that are not user-supplied ``extra`` fields, and uvicorn's
# ``color_message`` (the message again, with terminal colour codes).
_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "color_message",
}
_HANDLER_NAME = "vaebm-service"


class RequestIdFilter(logging.Filter):
    """Add ``request_id`` (or None) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON line: time, level, logger, message, request id, extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class DropStartupTraceback(logging.Filter):
    """Drop uvicorn's copy of the lifespan traceback for a :class:`StartupError`.

    The lifespan has already logged one clear line (and the traceback itself when the cause
    was unexpected), so the server's duplicate only buries the message.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Traceback") and "service.runtime.StartupError:" in message)


def configure_logging(level: str = "INFO", *, json_lines: bool = True) -> None:
    """Send every logger's records to stderr, as JSON lines or plain text.

    Idempotent: calling it again replaces the handler it installed before.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == _HANDLER_NAME:
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(RequestIdFilter())
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
        )
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    uvicorn_error = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, DropStartupTraceback) for f in uvicorn_error.filters):
        uvicorn_error.addFilter(DropStartupTraceback())
