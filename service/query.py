"""Refuse query parameters a route does not take.

FastAPI ignores a query parameter no route declares, so ``POST /score?scores=elbo_bpd``
(a typo of ``score``) used to decide on the default score without a word, and
``?score=a&score=b`` silently used the last. Both are now a 422 naming the parameter and
the route's own parameters, read from the route's declared dependencies (the same ones
the OpenAPI schema lists).
"""

from __future__ import annotations

from collections import Counter

from fastapi import Request
from fastapi.dependencies.models import Dependant

from service.errors import ProblemError


def declared_query_names(dependant: Dependant) -> frozenset[str]:
    """The query parameter names a route (or dependency) and all its sub-dependencies take."""
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= declared_query_names(sub)
    return frozenset(names)


async def reject_unknown_query_parameters(request: Request) -> None:
    """Dependency of the protected routers: 422 for an undeclared or repeated query
    parameter (``unknown-query-parameter``, ``repeated-query-parameter``)."""
    if not request.query_params:
        return
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    allowed = declared_query_names(dependant)
    takes = f"this route takes {', '.join(sorted(allowed))}" if allowed else "this route takes none"
    counts = Counter(name for name, _ in request.query_params.multi_items())
    for name in counts:
        if name not in allowed:
            raise ProblemError(
                422, "unknown-query-parameter", f"unknown query parameter {name!r}; {takes}"
            )
    for name, count in counts.items():
        if count > 1:
            raise ProblemError(
                422,
                "repeated-query-parameter",
                f"query parameter {name!r} is given {count} times; give it once",
            )
