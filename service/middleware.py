"""Pure ASGI middleware: request context (id, logs, metrics, model headers) and body limit.

Pure ASGI rather than ``BaseHTTPMiddleware`` so that request bodies stream through
untouched and the byte count is enforced as the body arrives.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ProblemError, problem_response, problem_type
from service.logs import request_id_var

logger = logging.getLogger("service.access")

REQUEST_ID_HEADER = "X-Request-ID"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
UNMATCHED_ROUTE = "unmatched"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class RequestContextMiddleware:
    """Request id, one access log line, request metrics and model headers on every response.

    The client's ``X-Request-ID`` is kept when it is short and plain, else a new one is
    made; either way it is echoed in the response. Unhandled errors become a 500 problem
    with the request id, logged with their traceback.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id")
        rid = given if given and _VALID_REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        token = request_id_var.set(rid)
        state: dict[str, Any] = {"status": 500, "started": False}
        extra_headers = _model_headers(scope)

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                state["started"] = True
                headers = MutableHeaders(scope=message)
                headers[REQUEST_ID_HEADER] = rid
                for key, value in extra_headers.items():
                    headers.setdefault(key, value)
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            logger.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if state["started"]:
                raise
            response = problem_response(
                500,
                f"internal error; quote request id {rid} when reporting it",
                type_=problem_type("internal-error"),
                instance=scope["path"],
                request_id=rid,
            )
            await response(scope, receive, send_wrapper)
        finally:
            seconds = time.perf_counter() - started
            self._record(scope, state["status"], seconds)
            request_id_var.reset(token)

    @staticmethod
    def _record(scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or UNMATCHED_ROUTE
        metrics = getattr(scope["app"].state, "metrics", None) if "app" in scope else None
        if metrics is not None:
            metrics.observe_request(scope["method"], template, status, seconds)
        client = scope.get("client")
        logger.info(
            "%s %s -> %d in %.1f ms",
            scope["method"],
            scope["path"],
            status,
            seconds * 1000,
            extra={
                "method": scope["method"],
                "path": scope["path"],
                "route": template,
                "status": status,
                "duration_ms": round(seconds * 1000, 2),
                "client": client[0] if client else None,
            },
        )


def _model_headers(scope: Scope) -> dict[str, str]:
    app = scope.get("app")
    runtime = getattr(app.state, "runtime", None) if app is not None else None
    if runtime is None:
        return {}
    ref = runtime.model_ref
    return {
        "X-Model-Name": ref["name"],
        "X-Model-Version": ref["version"],
        "X-Model-SHA256": ref["weights_sha256"],
    }


def body_too_large(limit: int, detail: str | None = None) -> ProblemError:
    return ProblemError(
        413,
        "request-too-large",
        detail
        or f"the request body exceeds the limit of {limit} bytes (VAEBM_MAX_UPLOAD_BYTES); "
        "send fewer or smaller files",
        # Close the connection: else the server keeps reading (and dropping) the rest of
        # a body it has already refused, for as long as the client sends it.
        headers={"Connection": "close"},
    )


class BodySizeLimitMiddleware:
    """413 once a request body passes ``max_bytes``, counted as it streams.

    A declared ``Content-Length`` above the limit is refused at once; the count of the
    bytes actually received catches chunked bodies and lying headers. Past the limit,
    reading the body raises a :class:`ProblemError` (an ``HTTPException``), which FastAPI
    lets through its body parsing to the problem handler.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        declared_bytes = int(declared) if declared and declared.strip().isdigit() else None
        if declared_bytes is not None and declared_bytes > self.max_bytes:
            detail = (
                f"the request declares {declared_bytes} bytes, above the limit of "
                f"{self.max_bytes} bytes (VAEBM_MAX_UPLOAD_BYTES); send fewer or smaller files"
            )
            await self._refuse(scope, receive, send, detail)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise body_too_large(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except ProblemError as exc:
            if started or exc.status != 413:
                raise
            await self._refuse(scope, receive, send, exc.detail)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, detail: str) -> None:
        response = problem_response(
            413,
            detail,
            type_=problem_type("request-too-large"),
            instance=scope["path"],
            request_id=scope.get("state", {}).get("request_id"),
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)
