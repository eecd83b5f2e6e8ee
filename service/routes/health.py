"""Operations: ``/healthz`` (alive), ``/readyz`` (the model can serve), ``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response

from service.errors import ProblemError
from service.metrics import CONTENT_TYPE, ServiceMetrics
from service.routes.common import PROBLEM_RESPONSES
from service.schemas import HealthResponse, ModelRef, ReadyResponse

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthResponse, summary="Liveness")
async def healthz(request: Request) -> HealthResponse:
    """200 while the process runs, even before the model is ready."""
    runtime = request.app.state.runtime
    return HealthResponse(
        status="ok",
        ready=bool(request.app.state.ready),
        model=ModelRef(**runtime.model_ref) if runtime is not None else None,
    )


@router.get(
    "/readyz",
    response_model=ReadyResponse,
    responses={503: PROBLEM_RESPONSES[503]},
    summary="Readiness",
)
async def readyz(request: Request) -> ReadyResponse:
    """200 once checkpoint and calibration are loaded and the model is warmed up; else 503."""
    state = request.app.state
    if state.runtime is None or not state.ready:
        raise ProblemError(
            503,
            "not-ready",
            "shutting down" if state.stopping else "the model is loading or warming up",
            headers={"Retry-After": "5"},
        )
    return ReadyResponse(
        status="ready",
        device=str(state.runtime.device),
        warmup_seconds=state.warmup_seconds,
        model=ModelRef(**state.runtime.model_ref),
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {CONTENT_TYPE: {}}}},
)
async def prometheus_metrics(request: Request) -> Response:
    """The text exposition format of the app's own registry."""
    metrics: ServiceMetrics = request.app.state.metrics
    return Response(metrics.exposition(), media_type=CONTENT_TYPE)
