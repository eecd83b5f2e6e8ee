"""Pure ASGI middleware: request context (id, logs, metrics, model headers), body limits.

Pure ASGI rather than ``BaseHTTPMiddleware`` so that request bodies stream through
untouched and the byte count is enforced as the body arrives.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

import anyio
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import (
    CLIENT_CLOSED_REQUEST,
    ClientGone,
    ProblemError,
    problem_response,
    problem_type,
)
from service.logs import request_id_var

logger = logging.getLogger("service.access")

REQUEST_ID_HEADER = "X-Request-ID"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
UNMATCHED_ROUTE = "unmatched"


def _has_body(scope: Scope) -> bool:
    """Whether the request announces a body (a non-zero Content-Length, or chunks)."""
    length = _header(scope, b"content-length")
    chunked = "chunked" in (_header(scope, b"transfer-encoding") or "").lower()
    return chunked or (length is not None and length.strip() not in ("", "0"))


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
        template = route_template(scope)
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


def route_template(scope: Scope) -> str:
    """The path template of the route a request was for (``/score``), for metrics.

    Requests refused before routing (401 from the key check, 413 from a declared size)
    carry no route yet; their path counts when it is one of the API's paths (which have
    no path parameters). Any other path becomes ``"unmatched"``, never the raw path,
    which would be an unbounded label.
    """
    route_path = getattr(scope.get("route"), "path", None)
    if route_path:
        return route_path
    app = scope.get("app")
    path = scope["path"].removeprefix(scope.get("root_path", ""))  # behind a proxy prefix
    if app is not None and path in _api_paths(app):
        return path
    return UNMATCHED_ROUTE


def _api_paths(app: Any) -> frozenset[str]:
    """The paths of the app's OpenAPI schema and of its own plain routes (``/docs``,
    ``/openapi.json``), computed once per app."""
    paths = getattr(app.state, "api_paths", None)
    if paths is None:
        plain = {
            route.path for route in app.routes if isinstance(getattr(route, "path", None), str)
        }
        paths = frozenset(app.openapi()["paths"]) | plain
        app.state.api_paths = paths
    return paths


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


def body_too_large(limit: int, limit_name: str = "VAEBM_MAX_UPLOAD_BYTES") -> ProblemError:
    return ProblemError(
        413,
        "request-too-large",
        f"the request body exceeds the limit of {limit} bytes ({limit_name}); "
        "send fewer or smaller files",
        # Close the connection: else the server keeps reading (and dropping) the rest of
        # a body it has already refused, for as long as the client sends it.
        headers={"Connection": "close"},
    )


def body_timed_out(timeout_s: float) -> ProblemError:
    return ProblemError(
        408,
        "request-timeout",
        f"no part of the request body arrived for {timeout_s:g} s (VAEBM_BODY_TIMEOUT_S); "
        "send the whole body, with a Content-Length that matches it",
        headers={"Connection": "close"},
    )


_REFUSED_WHILE_READING = (408, 413)
JSON_MEDIA_TYPE = "application/json"
# The one JSON body, /sample's, is a few hundred bytes; parsing megabytes of JSON would
# hold the event loop (60 MB: 1.3 s) for what can only be a 422.
MAX_JSON_BYTES = 64 * 1024


class BodyLimitsMiddleware:
    """Limits on request bodies, enforced as they stream in, before any route reads them.

    - Size: a declared ``Content-Length`` above ``max_bytes`` is refused at once (413);
      the count of the bytes actually received catches chunked bodies and lying headers.
    - Time: each piece of the body must arrive within ``timeout_s`` of the one before
      (408), so a client that stops sending (or declares more bytes than it sends)
      cannot hold a connection and its buffers forever. Like nginx's
      ``client_body_timeout``, a body that trickles in steadily is not cut off.
    - Encoding: a ``Content-Encoding`` other than identity is refused (415): no route
      decompresses bodies, and reading compressed bytes as an image or JSON would fail
      with a misleading message.
    - Unread bodies: a response that starts before the whole body has arrived (a 401
      from the key check inside, a 404, a 415) closes the connection.

    Past a limit, reading the body raises a :class:`ProblemError` (an ``HTTPException``),
    which FastAPI lets through its body parsing to the problem handler.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        codings = [
            coding.strip().lower()
            for value in headers.getlist("content-encoding")  # every header line counts
            for coding in value.split(",")
        ]
        if any(coding not in ("", "identity") for coding in codings):
            detail = (
                f"Content-Encoding {', '.join(codings)!r} is not supported; send the body "
                "uncompressed"
            )
            await self._refuse(
                scope, receive, send, ProblemError(415, "unsupported-media-type", detail)
            )
            return
        max_bytes, limit_name = self.max_bytes, "VAEBM_MAX_UPLOAD_BYTES"
        if headers.get("content-type", "").partition(";")[0].strip().lower() == JSON_MEDIA_TYPE:
            max_bytes, limit_name = min(max_bytes, MAX_JSON_BYTES), "the limit for JSON bodies"
        declared = headers.get("content-length")
        declared_bytes = int(declared) if declared and declared.strip().isdigit() else None
        if declared_bytes is not None and declared_bytes > max_bytes:
            detail = (
                f"the request declares {declared_bytes} bytes, above the limit of "
                f"{max_bytes} bytes ({limit_name}); send fewer or smaller files"
            )
            await self._refuse(scope, receive, send, ProblemError(413, "request-too-large", detail))
            return
        received = 0
        body_done = not _has_body(scope)
        started = False

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # after the body only a disconnect can come: no time limit
                return await receive()
            # A cancel scope (anyio's, which Starlette runs on; asyncio.timeout needs
            # Python 3.11), not asyncio.wait_for: no extra task per piece of the body.
            try:
                with anyio.fail_after(self.timeout_s):
                    message = await receive()
            except TimeoutError:
                raise body_timed_out(self.timeout_s) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > max_bytes:
                    raise body_too_large(max_bytes, limit_name)
            elif message["type"] == "http.disconnect":  # gone before its body was sent
                raise ClientGone(f"the client left after sending {received} bytes of the body")
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if not body_done:
                    # Answered before the body was read (a 401, 404, 405, 415...): close
                    # the connection, else the server reads and drops the rest of the
                    # body, without any size limit, to reuse the connection.
                    MutableHeaders(scope=message)["Connection"] = "close"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except ProblemError as exc:
            if started or exc.status not in (*_REFUSED_WHILE_READING, CLIENT_CLOSED_REQUEST):
                raise
            await self._refuse(scope, receive, send, exc)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, exc: ProblemError) -> None:
        response = problem_response(
            exc.status,
            exc.detail,
            type_=exc.type,
            title=exc.title,
            instance=scope["path"],
            request_id=scope.get("state", {}).get("request_id"),
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)
