"""In-distribution reference sets for ``/evaluate``, scored once and cached.

``calibration`` is always there: the calibration scores stored with the checkpoint (only
for the scores the calibration has). More sets are registered in ``VAEBM_REFERENCE_SETS``
as name -> data spec (any source of ``training.data``); each is loaded and scored on first
use (or at start-up with ``VAEBM_REFERENCE_PRELOAD``) and kept in memory.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import numpy as np

from service.errors import ProblemError
from service.runtime import ModelRuntime
from service.schemas import ReferenceKind
from service.settings import CALIBRATION_REFERENCE

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReferenceScores:
    """Scores of one in-distribution reference set."""

    name: str
    kind: ReferenceKind
    scores: dict[str, np.ndarray]  # score name -> (n,) scores; missing = unavailable
    n_images: int


def load_reference_images(spec: str, shape: tuple[int, int, int], max_images: int) -> np.ndarray:
    """Images of a data spec in the model's shape, uint8 (N, C, H, W), at most max_images."""
    from training.data import ImageShape, load_dataset  # only when a set is registered

    channels, size, _ = shape
    images = load_dataset(spec, ImageShape(channels, size))
    if len(images) > max_images:
        logger.warning(
            "reference spec %s has %d images; using the first %d (VAEBM_REFERENCE_MAX_IMAGES)",
            spec,
            len(images),
            max_images,
        )
        images = images[:max_images]
    return images


class ReferenceStore:
    """Named reference sets: the calibration plus the registered specs."""

    def __init__(
        self, runtime: ModelRuntime, specs: dict[str, str], *, max_images: int, chunk: int
    ) -> None:
        self.runtime = runtime
        self.specs = dict(specs)
        self.max_images = max_images
        self.chunk = chunk
        self._cache: dict[str, ReferenceScores] = {}
        self._locks = {name: asyncio.Lock() for name in self.specs}

    @property
    def names(self) -> list[str]:
        return [CALIBRATION_REFERENCE, *self.specs]

    def calibration_set(self) -> ReferenceScores:
        cal = self.runtime.calibration
        scores = {name: np.asarray(c.sorted_scores) for name, c in cal.scores.items()}
        n = max((c.n for c in cal.scores.values()), default=0)
        return ReferenceScores(CALIBRATION_REFERENCE, "calibration", scores, n)

    def cached(self, name: str) -> ReferenceScores | None:
        if name == CALIBRATION_REFERENCE:
            return self.calibration_set()
        return self._cache.get(name)

    async def get(self, name: str) -> ReferenceScores:
        """The scores of reference set ``name``, loading and scoring it on first use.

        Raises
        ------
        ProblemError
            422 for an unknown name (listing the registered ones); 500 when a registered
            set cannot be loaded (the configuration is wrong).
        """
        if name == CALIBRATION_REFERENCE:
            return self.calibration_set()
        if name not in self.specs:
            raise ProblemError(
                422,
                "unknown-reference-set",
                f"unknown reference set {name!r}; registered: {', '.join(self.names)}",
            )
        async with self._locks[name]:
            if name not in self._cache:
                self._cache[name] = await self._score(name)
        return self._cache[name]

    async def _score(self, name: str) -> ReferenceScores:
        spec = self.specs[name]
        try:
            images = await self.runtime.run(
                load_reference_images, spec, self.runtime.image_shape, self.max_images
            )
        except ValueError as exc:  # training.data.DataError is a ValueError
            raise ProblemError(
                500,
                "reference-set-unavailable",
                f"reference set {name!r} (spec {spec!r}) cannot be loaded: {exc}; fix "
                "VAEBM_REFERENCE_SETS",
            ) from exc
        parts: dict[str, list[np.ndarray]] = {s: [] for s in self.runtime.calibration.score_names}
        for start in range(0, len(images), self.chunk):  # chunks let /score interleave
            scores = await self.runtime.run(
                self.runtime.score_batch, images[start : start + self.chunk]
            )
            for s, values in scores.items():
                parts[s].append(values)
        logger.info("reference set %s scored: %d images from %s", name, len(images), spec)
        joined = {s: np.concatenate(v) for s, v in parts.items()}
        return ReferenceScores(name, "registered", joined, len(images))
