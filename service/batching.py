"""Micro-batching: concurrent score requests share one forward pass.

Requests put single images on an asyncio queue. One collector task takes the first
waiting image, then keeps taking more until the batch holds ``max_batch_size`` images or
``max_wait_s`` has passed since the first one, and runs the batch function on a worker
thread (never on the event loop). While a batch computes, new requests queue up and form
the next batch, so under load batches fill without waiting.

Scores are reproducible per image (``model.scores`` seeds each image from its bytes), so
which batch an image lands in does not change its scores.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from service.errors import ProblemError

logger = logging.getLogger(__name__)

BatchFn = Callable[[np.ndarray], dict[str, np.ndarray]]
"""uint8 (B, C, H, W) -> name -> (B,) scores."""


@dataclass
class _Item:
    image: np.ndarray  # (C, H, W) uint8
    future: asyncio.Future[dict[str, float]]


class BatcherClosed(ProblemError):
    """The batcher is shutting down and takes no more work (503 for the client)."""

    def __init__(self) -> None:
        super().__init__(
            503,
            "not-ready",
            "the service is shutting down; retry on another instance or after restart",
            headers={"Retry-After": "5"},
        )


class MicroBatcher:
    """Coalesce single-image requests into batches for ``fn``.

    Parameters
    ----------
    fn : callable
        uint8 array (B, C, H, W) -> dict of (B,) float arrays; runs on ``executor``.
    executor : concurrent.futures.Executor
        Where ``fn`` runs (one thread keeps the model's work serialised).
    max_batch_size : int
        Most images per call of ``fn``.
    max_wait_s : float
        Longest time the first image of a batch waits for company.
    enabled : bool
        False: every image is its own batch, called as it arrives (for comparison).
    on_batch : callable, optional
        Called with ``(batch_size, seconds)`` after every call of ``fn``.
    history : int
        How many recent batch sizes :attr:`batch_sizes` keeps.
    """

    def __init__(
        self,
        fn: BatchFn,
        *,
        executor: Executor,
        max_batch_size: int,
        max_wait_s: float,
        enabled: bool = True,
        on_batch: Callable[[int, float], None] | None = None,
        history: int = 1024,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.fn = fn
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.enabled = enabled
        self.on_batch = on_batch
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=history)
        self._queue: asyncio.Queue[_Item | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self) -> None:
        """Start the collector task (on the running event loop)."""
        if self.enabled and self._task is None:
            self._task = asyncio.create_task(self._collect(), name="vaebm-microbatcher")

    async def stop(self) -> None:
        """Finish every queued image, then stop the collector."""
        self._closed = True
        if self._task is not None:
            await self._queue.put(None)
            await self._task
            self._task = None

    async def submit(self, image: np.ndarray) -> dict[str, float]:
        """Scores of one image (C, H, W); waits for its batch."""
        return (await self.submit_many([image]))[0]

    async def submit_many(self, images: Sequence[np.ndarray]) -> list[dict[str, float]]:
        """Scores of several images, in order; they may be split over batches."""
        if self._closed:
            raise BatcherClosed()
        if not self.enabled:
            return await self._run_direct(images)
        loop = asyncio.get_running_loop()
        items = [_Item(image, loop.create_future()) for image in images]
        for item in items:
            self._queue.put_nowait(item)
        return list(await asyncio.gather(*(item.future for item in items)))

    async def _run_direct(self, images: Sequence[np.ndarray]) -> list[dict[str, float]]:
        results: list[dict[str, float]] = []
        for start in range(0, len(images), self.max_batch_size):
            chunk = list(images[start : start + self.max_batch_size])
            results.extend(await self._run(chunk))
        return results

    async def _run(self, images: list[np.ndarray]) -> list[dict[str, float]]:
        batch = np.stack(images)  # (B, C, H, W)
        loop = asyncio.get_running_loop()
        scores, seconds = await loop.run_in_executor(self.executor, self._timed, batch)
        self.batch_sizes.append(len(images))
        if self.on_batch is not None:
            self.on_batch(len(images), seconds)
        return [{name: float(v[i]) for name, v in scores.items()} for i in range(len(images))]

    def _timed(self, batch: np.ndarray) -> tuple[dict[str, np.ndarray], float]:
        """``fn(batch)`` and its duration, measured on the worker (queueing excluded)."""
        started = time.perf_counter()
        scores = self.fn(batch)
        return scores, time.perf_counter() - started

    async def _gather_batch(self, first: _Item) -> tuple[list[_Item], bool]:
        """Collect up to max_batch_size items; returns (items, stop_requested)."""
        items = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(items) < self.max_batch_size:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            if item is None:
                return items, True
            items.append(item)
        return items, False

    async def _run_items(self, items: list[_Item]) -> None:
        """Score one batch and resolve its futures (skipping requests already gone)."""
        items = [item for item in items if not item.future.done()]
        if not items:
            return
        try:
            results = await self._run([item.image for item in items])
        except Exception as exc:  # the batch failed: every request in it gets the error
            logger.exception("scoring a batch of %d images failed", len(items))
            for item in items:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        for item, result in zip(items, results, strict=True):
            if not item.future.done():
                item.future.set_result(result)

    async def _collect(self) -> None:
        while True:
            first = await self._queue.get()
            if first is None:
                break
            items, stop = await self._gather_batch(first)
            await self._run_items(items)
            if stop:
                break
        # Nothing is queued after the stop sentinel (submit refuses once closed), but
        # drain defensively so that no request is left waiting forever.
        rest = [item for item in iter_queue(self._queue) if item is not None]
        for start in range(0, len(rest), self.max_batch_size):
            await self._run_items(rest[start : start + self.max_batch_size])


def iter_queue(queue: asyncio.Queue[_Item | None]) -> list[_Item | None]:
    """Everything currently in ``queue``, removed from it."""
    out = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out
