"""``POST /sample``: images drawn from the VAEBM by Langevin dynamics, as PNG or JSON."""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from model.grid import encode_png, image_grid
from service.cancellation import step_check, unless_stopped
from service.deps import MetricsDep, RuntimeDep, SettingsDep
from service.errors import ProblemError, field_error, validation_problem
from service.routes.common import PROBLEM_RESPONSES, problem_doc
from service.schemas import ModelRef, SampleImage, SampleRequest, SampleResponse
from service.settings import Settings

router = APIRouter(tags=["sample"])


async def sample_slot(request: Request, settings: SettingsDep) -> AsyncIterator[None]:
    """Hold one of VAEBM_SAMPLE_MAX_CONCURRENT sampling slots; 429 when none is free.

    Samples interleave with scoring step by step on the one model thread, so each
    running sample slows every other request: a bound keeps that slowdown bounded.
    """
    state = request.app.state
    if state.samples_running >= settings.sample_max_concurrent:
        raise ProblemError(
            429,
            "too-many-samples",
            f"{state.samples_running} samples are being drawn, the limit "
            f"(VAEBM_SAMPLE_MAX_CONCURRENT) is {settings.sample_max_concurrent}; retry later",
            headers={"Retry-After": "10"},
        )
    state.samples_running += 1
    try:
        yield
    finally:
        state.samples_running -= 1


def check_caps(request: SampleRequest, settings: Settings) -> None:
    """422 (same shape as validation errors) when n or steps pass the configured caps."""
    errors = []
    if request.n > settings.sample_max_n:
        msg = f"n must be <= {settings.sample_max_n} (VAEBM_SAMPLE_MAX_N), got {request.n}"
        errors.append(field_error("n", msg, "less_than_equal"))
    if request.steps > settings.sample_max_steps:
        msg = (
            f"steps must be <= {settings.sample_max_steps} (VAEBM_SAMPLE_MAX_STEPS), "
            f"got {request.steps}"
        )
        errors.append(field_error("steps", msg, "less_than_equal"))
    if errors:
        raise validation_problem(errors)


@router.post(
    "/sample",
    response_model=SampleResponse,
    responses={
        **PROBLEM_RESPONSES,
        429: problem_doc("VAEBM_SAMPLE_MAX_CONCURRENT samples are already being drawn"),
        200: {
            "description": "a PNG grid (format=png) or one base64 PNG per sample (format=json)",
            "content": {"image/png": {}},
        },
    },
    summary="Draw samples from the model",
    dependencies=[Depends(sample_slot)],
)
async def sample(
    request: Request,
    runtime: RuntimeDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    body: SampleRequest | None = None,
) -> Response | SampleResponse:
    """Langevin samples; the same seed (and n, steps, step_size) gives the same bytes.
    Every field has a default, so no body at all is a request for the defaults.

    The work stops when the client disconnects (status 499 in the logs and metrics) or
    the service starts shutting down (503).
    """
    body = body if body is not None else SampleRequest()
    check_caps(body, settings)
    seed = body.seed if body.seed is not None else secrets.randbelow(2**63)
    step_size = body.step_size or runtime.info.langevin_step_size
    started = time.perf_counter()
    check = step_check(request, "sampling", body.steps)
    images = await unless_stopped(
        request,
        runtime.sample_uint8(body.n, body.steps, step_size, seed, before_step=check),
        unfinished="the sample was not finished",
    )
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
