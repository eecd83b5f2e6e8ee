"""``GET /model``: what is served, its scores (units, directions) and its calibration."""

from __future__ import annotations

from fastapi import APIRouter

from model.scores import SCORES
from service.deps import RuntimeDep, SettingsDep
from service.routes.common import PROBLEM_RESPONSES
from service.schemas import (
    CalibrationSummary,
    ImageShapeInfo,
    Limits,
    ModelRef,
    ModelResponse,
    ScoreCalibrationInfo,
    ScoreInfo,
)

router = APIRouter(tags=["model"])


@router.get(
    "/model", response_model=ModelResponse, responses=PROBLEM_RESPONSES, summary="Model metadata"
)
async def model_metadata(runtime: RuntimeDep, settings: SettingsDep) -> ModelResponse:
    """Name, version, weights hash, image shape, scores table and calibration summary."""
    calibration = runtime.calibration
    channels, height, width = runtime.image_shape
    return ModelResponse(
        **runtime.model_ref,
        device=str(runtime.device),
        image_shape=ImageShapeInfo(channels=channels, height=height, width=width),
        iwae_k=runtime.iwae_k,
        scores=[
            ScoreInfo(
                name=spec.name,
                unit=spec.unit,
                description=spec.description,
                direction=spec.direction,
                calibrated=spec.name in calibration.scores,
            )
            for spec in SCORES.values()
        ],
        calibration=CalibrationSummary(
            target_fpr=calibration.target_fpr,
            default_score=calibration.default_score,
            iwae_k=calibration.iwae_k,
            seed=calibration.seed,
            data=calibration.data,
            scores={
                name: ScoreCalibrationInfo(
                    threshold=c.threshold,
                    target_fpr=c.target_fpr,
                    n=c.n,
                    achieved_fpr=c.achieved_fpr,
                    fpr_ci_low=c.fpr_ci_low,
                    fpr_ci_high=c.fpr_ci_high,
                )
                for name, c in calibration.scores.items()
            },
        ),
        limits=Limits(
            max_upload_bytes=settings.max_upload_bytes,
            max_image_pixels=settings.max_image_pixels,
            max_batch_files=settings.max_batch_files,
            resize=settings.resize.value,
            sample_max_n=settings.sample_max_n,
            sample_max_steps=settings.sample_max_steps,
        ),
        model=ModelRef(**runtime.model_ref),
    )
