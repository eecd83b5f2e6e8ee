"""OpenAPI descriptions shared by the routers."""

from __future__ import annotations

from typing import Any

from service.errors import PROBLEM_MEDIA_TYPE
from service.schemas import Problem


def _problem(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "model": Problem,
        "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _problem("malformed request body (multipart or JSON syntax, encoding)"),
    401: _problem("missing or invalid API key"),
    413: _problem("request body, image pixels or file count above the limits"),
    415: _problem("not a supported image format"),
    422: _problem("invalid request or undecodable image"),
    503: _problem("the model is not ready"),
}
