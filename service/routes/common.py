"""OpenAPI descriptions shared by the routers."""

from __future__ import annotations

from typing import Any

from service.errors import PROBLEM_MEDIA_TYPE
from service.schemas import Problem


def problem_doc(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "model": Problem,
        "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: problem_doc("malformed request body (multipart or JSON syntax, encoding)"),
    401: problem_doc("missing or invalid API key"),
    408: problem_doc("the request body stopped arriving (VAEBM_BODY_TIMEOUT_S)"),
    413: problem_doc("request body, image pixels or file count above the limits"),
    415: problem_doc("not a supported image format, media type or content encoding"),
    422: problem_doc("invalid request or undecodable image"),
    503: problem_doc("the model is not ready"),
}
