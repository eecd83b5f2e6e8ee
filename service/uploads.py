"""Glue between FastAPI uploads and :mod:`service.imaging` (decoding off the event loop)."""

from __future__ import annotations

import numpy as np
from fastapi import UploadFile
from starlette.concurrency import run_in_threadpool

from service.errors import ProblemError
from service.imaging import ImageInfo, decode_image
from service.runtime import ModelRuntime
from service.settings import Settings


async def decode_upload(
    upload: UploadFile, settings: Settings, runtime: ModelRuntime
) -> tuple[np.ndarray, ImageInfo]:
    """Decode one uploaded file to uint8 (C, H, W) in the model's shape.

    Raises
    ------
    ProblemError
        413, 415 or 422 as :func:`service.imaging.decode_image` decides.
    """
    data = await upload.read()
    channels, size, _ = runtime.image_shape
    return await run_in_threadpool(
        decode_image,
        data,
        channels=channels,
        size=size,
        max_pixels=settings.max_image_pixels,
        resize=settings.resize,
        content_type=upload.content_type,
    )


async def decode_or_problem(
    upload: UploadFile, settings: Settings, runtime: ModelRuntime
) -> tuple[np.ndarray, ImageInfo] | ProblemError:
    """As :func:`decode_upload`, returning the problem instead of raising it."""
    try:
        return await decode_upload(upload, settings, runtime)
    except ProblemError as exc:
        return exc


def check_file_count(count: int, settings: Settings, field: str) -> None:
    """413 when a request carries more files than VAEBM_MAX_BATCH_FILES."""
    if count > settings.max_batch_files:
        raise ProblemError(
            413,
            "too-many-files",
            f"{count} files in '{field}', above the limit of {settings.max_batch_files} per "
            "request (VAEBM_MAX_BATCH_FILES); split them over several requests",
        )
