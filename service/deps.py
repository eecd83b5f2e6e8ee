"""Dependencies of the routes, as ``Annotated`` aliases for short signatures.

All are ``async def``: they only read ``app.state``, and FastAPI runs a plain ``def``
dependency on a worker thread, a hop that cost more than the lookup itself (measured by
``benchmarks/service_overhead.py``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.errors import ProblemError
from service.metrics import ServiceMetrics
from service.references import ReferenceStore
from service.runtime import ModelRuntime
from service.settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


async def get_runtime(request: Request) -> ModelRuntime:
    """The loaded model; 503 while it is loading or the service is shutting down."""
    runtime = request.app.state.runtime
    if runtime is None or not request.app.state.ready:
        raise ProblemError(
            503,
            "not-ready",
            "the model is not loaded yet or the service is shutting down; retry shortly "
            "(GET /readyz says when it is ready)",
            headers={"Retry-After": "5"},
        )
    return runtime


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
RuntimeDep = Annotated[ModelRuntime, Depends(get_runtime)]


async def get_references(request: Request, runtime: RuntimeDep) -> ReferenceStore:
    """The reference sets of ``/evaluate`` (503 until the model is ready)."""
    return request.app.state.references


ReferencesDep = Annotated[ReferenceStore, Depends(get_references)]
