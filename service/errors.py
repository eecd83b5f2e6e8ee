"""RFC 9457 problem details: every error leaves the service as ``application/problem+json``.

A body always holds ``type``, ``title``, ``status`` and ``detail``, plus ``instance`` (the
request path) and ``request_id`` so that a client can quote the log line. Errors of the
service itself have a ``type`` URN naming the problem; plain HTTP errors (404, 405) use
``about:blank`` with the status phrase as title, as the RFC suggests.
"""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM_MEDIA_TYPE = "application/problem+json"
TYPE_PREFIX = "urn:vaebm-ood:problem:"
ABOUT_BLANK = "about:blank"


def problem_type(slug: str) -> str:
    """The ``type`` URI of a service problem, e.g. ``urn:vaebm-ood:problem:image-too-large``."""
    return TYPE_PREFIX + slug


class ProblemError(StarletteHTTPException):
    """An error that maps to one problem-details response.

    A subclass of Starlette's ``HTTPException`` so that it passes through FastAPI's body
    parsing unchanged (the request-size limit raises it while the body streams in).

    Parameters
    ----------
    status : int
        HTTP status code.
    slug : str
        Short problem name, becomes ``type`` (``urn:vaebm-ood:problem:<slug>``).
    detail : str
        What was wrong, what was expected and what to do.
    title : str, optional
        Short summary; defaults to the status phrase.
    headers : dict, optional
        Extra response headers (e.g. ``WWW-Authenticate``).
    extra : dict, optional
        Extension members added to the body.
    """

    def __init__(
        self,
        status: int,
        slug: str,
        detail: str,
        *,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(status, detail, headers)
        self.status = status
        self.type = problem_type(slug)
        self.title = title or HTTPStatus(status).phrase
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        """The problem members without ``instance``/``request_id`` (for embedding)."""
        return {
            "type": self.type,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            **self.extra,
        }


CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request its client abandoned


class ClientGone(ProblemError):
    """The client disconnected before its request finished, so its work stopped.

    Nobody reads the response; the status, nginx's 499, is for the logs and metrics.
    """

    def __init__(self, detail: str) -> None:
        super().__init__(
            CLIENT_CLOSED_REQUEST, "client-closed-request", detail, title="Client Closed Request"
        )


class ShuttingDown(ProblemError):
    """The service began shutting down while the request's long work was under way."""

    def __init__(self, detail: str) -> None:
        super().__init__(503, "not-ready", detail, headers={"Retry-After": "5"})


def field_error(field: str, msg: str, type_: str = "value_error") -> dict[str, str]:
    """One ``errors`` entry of a validation problem, for a field of the request body."""
    return {"loc": f"body.{field}", "msg": msg, "type": type_}


def validation_problem(errors: list[dict[str, str]]) -> ProblemError:
    """422 with one ``errors`` entry per bad field, shaped like FastAPI's own validation
    errors (:func:`handle_validation_error`), for checks a schema cannot express."""
    return ProblemError(
        422,
        "validation-error",
        "; ".join(f"{e['loc']}: {e['msg']}" for e in errors),
        title="Request validation failed",
        extra={"errors": errors},
    )


def problem_response(
    status: int,
    detail: str,
    *,
    type_: str = ABOUT_BLANK,
    title: str | None = None,
    instance: str | None = None,
    request_id: str | None = None,
    headers: Mapping[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    """Build an ``application/problem+json`` response."""
    body: dict[str, Any] = {
        "type": type_,
        "title": title or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    if instance is not None:
        body["instance"] = instance
    if request_id is not None:
        body["request_id"] = request_id
    body.update(extra or {})
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def _from_problem(request: Request, exc: ProblemError) -> JSONResponse:
    return problem_response(
        exc.status,
        exc.detail,
        type_=exc.type,
        title=exc.title,
        instance=request.url.path,
        request_id=_request_id(request),
        headers=exc.headers,
        extra=exc.extra,
    )


async def handle_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProblemError)
    return _from_problem(request, exc)


async def handle_http_exception(request: Request, exc: Exception) -> JSONResponse:
    """404, 405 and every other ``HTTPException`` raised by Starlette or FastAPI."""
    assert isinstance(exc, StarletteHTTPException)
    if isinstance(exc, ProblemError):
        return _from_problem(request, exc)
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    status = exc.status_code
    type_ = ABOUT_BLANK
    if status == 404:
        detail = f"no route matches {request.method} {request.url.path}; see /docs for the API"
    elif status == 405:
        allowed = (exc.headers or {}).get("Allow") or (exc.headers or {}).get("allow")
        detail = f"method {request.method} is not allowed on {request.url.path}" + (
            f"; allowed: {allowed}" if allowed else ""
        )
    elif status == 400 and detail.startswith("Too many files"):
        # Starlette's multipart parser stops at its own file cap before our route can count.
        status, type_ = 413, problem_type("too-many-files")
        limit = request.app.state.settings.max_batch_files
        detail = (
            f"more files than the multipart parser reads (its cap is 1000); the limit is "
            f"{limit} per request (VAEBM_MAX_BATCH_FILES): split them over several requests"
        )
    return problem_response(
        status,
        detail,
        type_=type_,
        instance=request.url.path,
        request_id=_request_id(request),
        headers=dict(exc.headers or {}),
    )


def _location(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(part) for part in loc)


async def handle_validation_error(request: Request, exc: Exception) -> JSONResponse:
    """Request validation errors: 422 with one ``errors`` entry per bad field."""
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": _location(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type")}
        for err in exc.errors()
    ]
    detail = "; ".join(f"{err['loc']}: {err['msg']}" for err in errors) or "invalid request"
    return problem_response(
        422,
        detail,
        type_=problem_type("validation-error"),
        title="Request validation failed",
        instance=request.url.path,
        request_id=_request_id(request),
        extra={"errors": errors},
    )


def install_error_handlers(app: FastAPI) -> None:
    """Register the problem-details handlers on ``app``."""
    app.add_exception_handler(ProblemError, handle_problem)
    app.add_exception_handler(StarletteHTTPException, handle_http_exception)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    # Unhandled exceptions become a 500 problem in RequestContextMiddleware, which knows
    # the request id and logs the traceback.
