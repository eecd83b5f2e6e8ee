"""The app factory: ``create_app(settings)`` and the lifespan that loads the model once.

Start-up order: load checkpoint and calibration (checked against each other), move the
model to the device, score one warm-up batch, start the micro-batcher, then report ready.
Any failure stops start-up with a :class:`StartupError` whose message says what to fix;
the app never serves a half-loaded model. On shutdown the app reports not ready first,
finishes queued scoring work, then releases the model thread.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.auth import ApiKeyMiddleware
from service.errors import ProblemError, install_error_handlers
from service.metrics import ServiceMetrics
from service.middleware import BodyLimitsMiddleware, RequestContextMiddleware
from service.references import ReferenceStore
from service.routes import api_router
from service.runtime import ModelRuntime, StartupError, attach_batcher, load_runtime, warm_up
from service.settings import Settings

logger = logging.getLogger(__name__)


def _package_version() -> str:
    try:
        return importlib.metadata.version("vaebm-ood")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        return "0+unknown"


DESCRIPTION = """Out-of-distribution scoring of images with VAEBM (a VAE corrected by an
energy-based model). Every score is **higher = more out-of-distribution**; decisions use
thresholds calibrated on held-out in-distribution images. Errors are RFC 9457
`application/problem+json`."""


async def _start(app: FastAPI, executor: ThreadPoolExecutor) -> ModelRuntime:
    settings: Settings = app.state.settings
    metrics: ServiceMetrics = app.state.metrics
    loop = asyncio.get_running_loop()
    runtime = await loop.run_in_executor(executor, load_runtime, settings, executor)
    attach_batcher(runtime, settings, metrics)
    metrics.bind_model(
        **runtime.model_ref,
        device=str(runtime.device),
        calibration_scores={n: c.sorted_scores for n, c in runtime.calibration.scores.items()},
    )
    if settings.warmup:
        app.state.warmup_seconds = await runtime.run(warm_up, runtime)
    references = ReferenceStore(
        runtime,
        settings.reference_sets,
        max_images=settings.reference_max_images,
        chunk=settings.batch_max_size,
    )
    if settings.reference_preload:
        for name in settings.reference_sets:
            try:
                await references.get(name)
            except ProblemError as exc:
                raise StartupError(exc.detail) from exc
    await runtime.batcher.start()
    app.state.references = references
    return runtime


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load, warm up, mark ready; on exit mark not ready and drain the batcher."""
    settings: Settings = app.state.settings
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vaebm-model")
    try:
        runtime = await _start(app, executor)
    except Exception as exc:
        if isinstance(exc, StartupError):
            message = str(exc)
            logger.error("start-up failed: %s", message)
        else:  # unexpected: keep the traceback
            message = f"{type(exc).__name__}: {exc}"
            logger.exception("start-up failed: %s", message)
        app.state.startup_error = message
        executor.shutdown(wait=False, cancel_futures=True)
        raise StartupError(message) from exc
    app.state.runtime = runtime
    app.state.stopping = False  # an app may be started again after a shutdown (tests do)
    app.state.ready = True
    app.state.metrics.ready.set(1)
    logger.info(
        "ready: model %s %s (weights %s...) on %s, checkpoint %s",
        runtime.info.name,
        runtime.info.version,
        runtime.info.weights_sha256[:16],
        runtime.device,
        settings.checkpoint,
    )
    try:
        yield
    finally:
        app.state.ready = False
        app.state.stopping = True
        app.state.metrics.ready.set(0)
        await runtime.batcher.stop()
        executor.shutdown(wait=True)
        logger.info("stopped: in-flight work finished")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the scoring app; the model loads when the lifespan starts.

    Parameters
    ----------
    settings : Settings, optional
        Configuration; default: read from ``VAEBM_*`` environment variables.

    Returns
    -------
    FastAPI
        The app, not ready (``/readyz`` 503) until its lifespan has started.
    """
    settings = settings if settings is not None else Settings()
    app = FastAPI(
        title="vaebm-ood scoring service",
        description=DESCRIPTION,
        version=_package_version(),
        lifespan=lifespan,
        redoc_url=None,
        # A redirect to the slash-less path would build its Location from the client's
        # Host header (and re-send an upload there); an unknown path is a plain 404.
        redirect_slashes=False,
    )
    app.state.settings = settings
    app.state.metrics = ServiceMetrics()
    app.state.runtime = None
    app.state.references = None
    app.state.ready = False
    app.state.stopping = False
    app.state.warmup_seconds = None
    app.state.startup_error = None
    app.state.samples_running = 0
    # Whether a shutdown can wait no longer for long work's next step, given how long the
    # step takes (the work then stops with a 503 instead of being cancelled):
    # `service.main.serve` sets a ShutdownDeadline on uvicorn.
    app.state.draining = lambda next_step_s=0.0: app.state.stopping
    install_error_handlers(app)
    app.include_router(api_router)
    # add_middleware wraps: the last added runs first (outermost). The body limits wrap
    # the key check, so that its 401s close connections whose body was not read.
    app.add_middleware(ApiKeyMiddleware, keys=settings.api_keys)
    app.add_middleware(
        BodyLimitsMiddleware,
        max_bytes=settings.max_upload_bytes,
        timeout_s=settings.body_timeout_s,
    )
    app.add_middleware(RequestContextMiddleware)
    return app
