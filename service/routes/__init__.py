"""Every router of the service, gathered in :data:`api_router`.

``health`` is public; the others require an API key when keys are configured.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from service.auth import require_api_key
from service.routes import evaluate, health, model, sample, score

api_router = APIRouter()
api_router.include_router(health.router)

protected = APIRouter(dependencies=[Depends(require_api_key)])
protected.include_router(score.router)
protected.include_router(evaluate.router)
protected.include_router(sample.router)
protected.include_router(model.router)
api_router.include_router(protected)

__all__ = ["api_router"]
