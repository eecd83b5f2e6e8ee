"""Optional API keys: ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.

Keys are compared with :func:`hmac.compare_digest` against every configured key (no early
exit), and are never logged. Health, readiness, metrics and the API docs are exempt.

Enforcement happens in :class:`ApiKeyMiddleware`, before the request body is read, so that
an unauthenticated client cannot make the server stream a large upload. The routers also
declare the two schemes as dependencies, which puts the "Authorize" button in ``/docs``.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Sequence

from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPBearer
from pydantic import SecretStr
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import ProblemError, problem_response, problem_type

EXEMPT_PATHS = frozenset(
    {"/healthz", "/readyz", "/metrics", "/docs", "/docs/oauth2-redirect", "/openapi.json"}
)
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="vaebm-ood"'}
_HOW = "send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"


def credentials_error(
    authorizations: Sequence[str], api_keys: Sequence[str], keys: Sequence[SecretStr]
) -> str | None:
    """None when the request carries a valid key, else what is wrong (for ``detail``).

    ``authorizations`` and ``api_keys`` are every value of the two headers, repeats
    included. Every key the request presents must be valid: a wrong bearer token beside
    a right ``X-API-Key`` is refused, as a repeated header with one wrong value is, and
    a non-Bearer ``Authorization`` header beside a right key.
    """
    candidates = [value.strip() for value in api_keys if value.strip()]
    for authorization in authorizations:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return f"the Authorization header must use the Bearer scheme; {_HOW}"
        candidates.append(token.strip())
    if not candidates:
        return f"an API key is required; {_HOW}"
    if all(_matches(candidate, keys) for candidate in candidates):
        return None
    return "the API key is not valid"


def _matches(candidate: str, keys: Iterable[SecretStr]) -> bool:
    given = candidate.encode()
    found = False
    for key in keys:  # compare with every key so timing does not reveal which one matched
        found |= hmac.compare_digest(given, key.get_secret_value().encode())
    return found


def unauthorized(detail: str) -> ProblemError:
    return ProblemError(401, "unauthorized", detail, headers=dict(_CHALLENGE))


class ApiKeyMiddleware:
    """Reject requests without a valid key (401) before their body is read."""

    def __init__(self, app: ASGIApp, keys: Sequence[SecretStr]) -> None:
        self.app = app
        self.keys = list(keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        error = credentials_error(
            headers.getlist("authorization"), headers.getlist("x-api-key"), self.keys
        )
        if error is None:
            await self.app(scope, receive, send)
            return
        response = problem_response(
            401,
            error,
            type_=problem_type("unauthorized"),
            instance=scope["path"],
            request_id=scope.get("state", {}).get("request_id"),
            headers=dict(_CHALLENGE),
        )
        await response(scope, receive, send)


_bearer = HTTPBearer(auto_error=False, description="an API key as a bearer token")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key")


async def require_api_key(
    request: Request,
    bearer: object = Security(_bearer),
    api_key: str | None = Security(_api_key),
) -> None:
    """Dependency of the protected routers: documents the schemes and re-checks the key."""
    keys = request.app.state.settings.api_keys
    if not keys:
        return
    error = credentials_error(
        request.headers.getlist("authorization"), request.headers.getlist("x-api-key"), keys
    )
    if error is not None:
        raise unauthorized(error)
