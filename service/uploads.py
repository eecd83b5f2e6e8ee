"""Glue between FastAPI uploads and :mod:`service.imaging` (decoding off the event loop)."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Awaitable, Callable

import numpy as np
from fastapi import Request, UploadFile
from starlette.concurrency import run_in_threadpool

from service.errors import ProblemError, field_error, validation_problem
from service.imaging import ImageInfo, decode_image
from service.runtime import ModelRuntime
from service.settings import Settings

Decoded = tuple[np.ndarray, ImageInfo]  # uint8 (C, H, W) in the model's shape, and its report


async def decode_upload(upload: UploadFile, settings: Settings, runtime: ModelRuntime) -> Decoded:
    """Decode one uploaded file to uint8 (C, H, W) in the model's shape, on a worker thread.

    Raises
    ------
    ProblemError
        413, 415 or 422 as :func:`service.imaging.decode_image` decides.
    """
    data = await upload.read()
    return await run_in_threadpool(_decode, data, upload.content_type, settings, runtime)


async def decode_uploads(
    uploads: list[UploadFile], settings: Settings, runtime: ModelRuntime
) -> list[Decoded | ProblemError]:
    """As :func:`decode_upload` for many files, in order, a bad file as its ProblemError.

    The files are decoded in at most one worker-thread hop per CPU core, each hop taking
    a contiguous share: a hop per file cost more than decoding a small image
    (``benchmarks/service_overhead.py``), while one hop per core still decodes large
    images in parallel.
    """
    contents = [(await upload.read(), upload.content_type) for upload in uploads]

    def decode_share(share: list[tuple[bytes, str | None]]) -> list[Decoded | ProblemError]:
        out: list[Decoded | ProblemError] = []
        for data, content_type in share:
            try:
                out.append(_decode(data, content_type, settings, runtime))
            except ProblemError as exc:
                out.append(exc)
        return out

    hops = max(1, min(len(contents), os.cpu_count() or 1))
    bounds = [len(contents) * i // hops for i in range(hops + 1)]
    shares = [contents[a:b] for a, b in itertools.pairwise(bounds)]
    decoded = await asyncio.gather(*(run_in_threadpool(decode_share, s) for s in shares))
    return [outcome for share in decoded for outcome in share]


def _decode(
    data: bytes, content_type: str | None, settings: Settings, runtime: ModelRuntime
) -> Decoded:
    channels, size, _ = runtime.image_shape
    return decode_image(
        data,
        channels=channels,
        size=size,
        max_pixels=settings.max_image_pixels,
        resize=settings.resize,
        content_type=content_type,
    )


def multipart_form(*single: str) -> Callable[[Request], Awaitable[None]]:
    """A route dependency: the body must be ``multipart/form-data`` (else 415), and each
    field named in ``single`` must come at most once and not empty (else 422).

    Without it a second ``file`` part would silently replace the first, an empty
    ``reference`` would silently mean the default, and a ``multipart/mixed`` body would
    be reported as a missing field. FastAPI has parsed the form by the time dependencies
    run; ``request.form()`` returns that parse.
    """

    async def check(request: Request) -> None:
        content_type = request.headers.get("content-type", "")
        media_type = content_type.partition(";")[0].strip().lower()
        if media_type != "multipart/form-data":
            raise ProblemError(
                415,
                "unsupported-media-type",
                f"send the request as multipart/form-data, got {media_type or 'no Content-Type'}",
            )
        form = await request.form()
        errors = []
        for name in single:
            values = form.getlist(name)
            if len(values) > 1:
                errors.append(field_error(name, f"expected one value, got {len(values)}"))
            elif values == [""]:
                errors.append(field_error(name, "must not be empty"))
        if errors:
            raise validation_problem(errors)

    return check


def check_file_count(count: int, settings: Settings, field: str) -> None:
    """413 when a request carries more files than VAEBM_MAX_BATCH_FILES."""
    if count > settings.max_batch_files:
        raise ProblemError(
            413,
            "too-many-files",
            f"{count} files in '{field}', above the limit of {settings.max_batch_files} per "
            "request (VAEBM_MAX_BATCH_FILES); split them over several requests",
        )
