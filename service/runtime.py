"""The loaded model and everything that works with it: load, warm up, score, sample.

One single-thread executor runs all model work, so that scoring batches, sampling and
reference-set scoring never race for the device, and the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import numpy as np
import torch

from model.calibration_file import Calibration, CalibrationError, load_calibration
from model.checkpoint import CheckpointError, CheckpointInfo, load_checkpoint
from model.device import select_device
from model.likelihood import to_uint8
from model.scores import forward_pass_sizes, score_in_batches
from model.vaebm import VAEBM, NoiseState
from service.batching import MicroBatcher
from service.metrics import ServiceMetrics
from service.settings import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")
CPU_FORWARD_MAX_IMAGES = 32  # benchmarks/service_bench.py: 32 beats 64 per image on CPU


class StartupError(RuntimeError):
    """The service cannot start: the message says why and what to do."""


@dataclass
class ModelRuntime:
    """A loaded, calibrated model on its device, with its micro-batcher."""

    model: VAEBM
    info: CheckpointInfo
    calibration: Calibration
    device: torch.device
    iwae_k: int
    seed: int
    executor: ThreadPoolExecutor
    forward_max_images: int = CPU_FORWARD_MAX_IMAGES
    batcher: MicroBatcher = field(init=False)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the model's input."""
        return tuple(self.model.vae.image_shape)  # type: ignore[return-value]

    @property
    def model_ref(self) -> dict[str, str]:
        return {
            "name": self.info.name,
            "version": self.info.version,
            "weights_sha256": self.info.weights_sha256,
        }

    def score_batch(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """All scores of a uint8 (B, C, H, W) batch (runs on the calling thread), in
        forward passes of at most ``forward_max_images`` (see ``chunk_sizes``), plus
        the fitted scores the calibration has a reference for."""
        scores = score_in_batches(
            self.model,
            images,
            batch_size=self.forward_max_images,
            iwae_k=self.iwae_k,
            seed=self.seed,
        )
        return self.calibration.with_fitted_scores(scores)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the model thread."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def sample_uint8(
        self,
        n: int,
        steps: int,
        step_size: float,
        seed: int,
        *,
        before_step: Callable[[int], Awaitable[None]] | None = None,
    ) -> np.ndarray:
        """n samples as uint8 (n, C, H, W); the same seed gives the same images.

        Each Langevin step is its own job on the model thread, so scoring batches that
        arrive meanwhile run between two steps: a long sample delays ``/score`` by one
        step, not by the whole chain. ``before_step(done)`` runs before every step and
        may stop the work by raising (``service.cancellation.step_check``).
        """
        noise, generator = await self.run(self.model.start_chains, n, seed)
        for done in range(steps):
            if before_step is not None:
                await before_step(done)
            noise = await self.run(
                partial(
                    self.model.langevin, noise, steps=1, step_size=step_size, generator=generator
                )
            )
        return await self.run(self._chain_images_uint8, noise)

    def _chain_images_uint8(self, noise: NoiseState) -> np.ndarray:
        """The chains' images as uint8 (n, C, H, W), copied to the host on the model thread
        (on a GPU the copy waits for every queued step: never on the event loop)."""
        return to_uint8(self.model.chain_images(noise)).cpu().numpy()


def load_runtime(settings: Settings, executor: ThreadPoolExecutor) -> ModelRuntime:
    """Load checkpoint and calibration onto the device; raise StartupError on any problem."""
    try:
        device = select_device(settings.device)
    except ValueError as exc:
        raise StartupError(f"cannot use device {settings.device!r}: {exc}") from exc
    directory = settings.checkpoint
    try:
        model, info = load_checkpoint(directory, device)
    except CheckpointError as exc:
        raise StartupError(
            f"cannot load the checkpoint ({exc}); set VAEBM_CHECKPOINT to a directory "
            "written by `vaebm train`"
        ) from exc
    try:
        calibration = load_calibration(directory, weights_sha256=info.weights_sha256)
    except CalibrationError as exc:
        raise StartupError(f"cannot load the calibration: {exc}") from exc
    iwae_k = settings.iwae_k or calibration.iwae_k
    if iwae_k != calibration.iwae_k:
        logger.warning(
            "VAEBM_IWAE_K=%d differs from the calibration's iwae_k=%d: thresholds and "
            "p-values of iwae-based scores may be off",
            iwae_k,
            calibration.iwae_k,
        )
    return ModelRuntime(
        model=model,
        info=info,
        calibration=calibration,
        device=device,
        iwae_k=iwae_k,
        seed=calibration.seed,
        executor=executor,
        forward_max_images=forward_pass_limit(settings, device),
    )


def forward_pass_limit(settings: Settings, device: torch.device) -> int:
    """VAEBM_FORWARD_MAX_IMAGES, or its default for the device: a GPU is fastest with the
    whole micro-batch in one pass, a CPU with passes of 32."""
    if settings.forward_max_images is not None:
        return settings.forward_max_images
    if device.type == "cpu":
        return min(CPU_FORWARD_MAX_IMAGES, settings.batch_max_size)
    return settings.batch_max_size


def attach_batcher(runtime: ModelRuntime, settings: Settings, metrics: ServiceMetrics) -> None:
    """Give the runtime its micro-batcher, feeding batch metrics."""
    runtime.batcher = MicroBatcher(
        runtime.score_batch,
        executor=runtime.executor,
        max_batch_size=settings.batch_max_size,
        max_wait_s=settings.batch_max_wait_s,
        enabled=settings.microbatching,
        on_batch=metrics.observe_batch,
    )


def warm_up(runtime: ModelRuntime) -> float:
    """Score all-black images once in every forward-pass size the service will use, so
    that the first requests pay no start-up cost and the heap starts near its steady size.
    """
    started = time.perf_counter()
    largest = runtime.forward_max_images
    bad: list[str] = []
    for size in forward_pass_sizes(largest):
        scores = runtime.score_batch(np.zeros((size, *runtime.image_shape), dtype=np.uint8))
        bad += [name for name, values in scores.items() if not np.all(np.isfinite(values))]
    if bad:
        raise StartupError(f"warm-up produced non-finite scores {bad}: the weights are broken")
    return time.perf_counter() - started
