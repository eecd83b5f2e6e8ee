"""``POST /sample``: images drawn from the VAEBM by Langevin dynamics, as PNG or JSON."""

from __future__ import annotations

import base64
import secrets
import time

from fastapi import APIRouter
from fastapi.responses import Response

from model.grid import encode_png, image_grid
from service.deps import MetricsDep, RuntimeDep, SettingsDep
from service.errors import ProblemError
from service.routes.common import PROBLEM_RESPONSES
from service.schemas import ModelRef, SampleImage, SampleRequest, SampleResponse
from service.settings import Settings

router = APIRouter(tags=["sample"])


def check_caps(request: SampleRequest, settings: Settings) -> None:
    """422 (same shape as validation errors) when n or steps pass the configured caps."""
    errors = []
    if request.n > settings.sample_max_n:
        errors.append(
            {
                "loc": "body.n",
                "msg": f"n must be <= {settings.sample_max_n} (VAEBM_SAMPLE_MAX_N), "
                f"got {request.n}",
                "type": "less_than_equal",
            }
        )
    if request.steps > settings.sample_max_steps:
        errors.append(
            {
                "loc": "body.steps",
                "msg": f"steps must be <= {settings.sample_max_steps} "
                f"(VAEBM_SAMPLE_MAX_STEPS), got {request.steps}",
                "type": "less_than_equal",
            }
        )
    if errors:
        raise ProblemError(
            422,
            "validation-error",
            "; ".join(f"{e['loc']}: {e['msg']}" for e in errors),
            title="Request validation failed",
            extra={"errors": errors},
        )


@router.post(
    "/sample",
    response_model=SampleResponse,
    responses={
        **PROBLEM_RESPONSES,
        200: {
            "description": "a PNG grid (format=png) or one base64 PNG per sample (format=json)",
            "content": {"image/png": {}},
        },
    },
    summary="Draw samples from the model",
)
async def sample(
    body: SampleRequest, runtime: RuntimeDep, settings: SettingsDep, metrics: MetricsDep
) -> Response | SampleResponse:
    """Langevin samples; the same seed (and n, steps, step_size) gives the same bytes."""
    check_caps(body, settings)
    seed = body.seed if body.seed is not None else secrets.randbelow(2**63)
    step_size = body.step_size or runtime.info.langevin_step_size
    started = time.perf_counter()
    images = await runtime.run(runtime.sample_uint8, body.n, body.steps, step_size, seed)
    metrics.inference_latency.labels("sample").observe(time.perf_counter() - started)
    channels, height, width = runtime.image_shape
    if body.format == "png":
        return Response(
            encode_png(image_grid(images)),
            media_type="image/png",
            headers={"X-Sample-Seed": str(seed), "Cache-Control": "no-store"},
        )
    return SampleResponse(
        n=body.n,
        steps=body.steps,
        step_size=step_size,
        seed=seed,
        width=width,
        height=height,
        channels=channels,
        images=[
            SampleImage(index=i, png_base64=base64.b64encode(encode_png(img)).decode("ascii"))
            for i, img in enumerate(images)
        ],
        model=ModelRef(**runtime.model_ref),
    )
