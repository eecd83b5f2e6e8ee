"""Every router of the service, gathered in :data:`api_router`.

``health`` is public; the others require an API key when keys are configured, and refuse
query parameters they do not take. Every GET route also answers HEAD (HTTP asks it of
servers, and load balancers probe with it).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.routing import APIRoute

from service.auth import require_api_key
from service.query import reject_unknown_query_parameters
from service.routes import evaluate, health, model, sample, score


def add_head_routes(router: APIRouter) -> None:
    """A HEAD twin of every GET route of ``router``: same endpoint, dependencies and
    headers; the server sends no body. Added before ``router`` is included anywhere, so
    the includer's dependencies (the API key check) cover the twins too. Kept out of the
    OpenAPI schema, where it would repeat the GET operation."""
    for route in list(router.routes):
        if isinstance(route, APIRoute) and "GET" in (route.methods or ()):
            router.add_api_route(
                route.path,
                route.endpoint,
                methods=["HEAD"],
                name=f"{route.name}_head",
                dependencies=route.dependencies,
                response_model=route.response_model,
                response_class=route.response_class,
                include_in_schema=False,
            )


for _module in (health, score, evaluate, sample, model):
    add_head_routes(_module.router)

api_router = APIRouter()
api_router.include_router(health.router)

protected = APIRouter(
    dependencies=[Depends(require_api_key), Depends(reject_unknown_query_parameters)]
)
protected.include_router(score.router)
protected.include_router(evaluate.router)
protected.include_router(sample.router)
protected.include_router(model.router)
api_router.include_router(protected)

__all__ = ["api_router"]
