"""Tests for service.batching.MicroBatcher with a stand-in batch function (no model)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.batching import BatcherClosed, MicroBatcher


class Recorder:
    """Batch function: score = the image's mean; records batch sizes and its thread."""

    def __init__(self, delay_s: float = 0.0, fail: bool = False) -> None:
        self.sizes: list[int] = []
        self.threads: set[str] = set()
        self.delay_s = delay_s
        self.fail = fail

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        self.sizes.append(len(batch))
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("boom")
        return {"mean": batch.reshape(len(batch), -1).mean(axis=1).astype(np.float64)}


def image(value: int) -> np.ndarray:
    return np.full((1, 2, 2), value, dtype=np.uint8)


def run_with_batcher(fn: Recorder, body, **options) -> object:
    """Run coroutine function ``body(batcher)`` with a started batcher; returns its result."""

    async def main() -> object:
        with ThreadPoolExecutor(1, thread_name_prefix="model") as pool:
            batcher = MicroBatcher(fn, executor=pool, **options)
            await batcher.start()
            try:
                return await body(batcher)
            finally:
                await batcher.stop()

    return asyncio.run(main())


def test_concurrent_submits_share_one_batch() -> None:
    fn = Recorder()

    async def body(batcher: MicroBatcher) -> list[dict[str, float]]:
        return await asyncio.gather(*(batcher.submit(image(v)) for v in range(10)))

    results = run_with_batcher(fn, body, max_batch_size=32, max_wait_s=0.05)
    assert [r["mean"] for r in results] == [float(v) for v in range(10)]
    assert fn.sizes == [10]
    assert fn.threads == {"model_0"}  # off the event loop, on the model thread


def test_max_batch_size_splits_batches_in_order() -> None:
    fn = Recorder()

    async def body(batcher: MicroBatcher) -> list[dict[str, float]]:
        return await batcher.submit_many([image(v) for v in range(7)])

    results = run_with_batcher(fn, body, max_batch_size=3, max_wait_s=0.05)
    assert [r["mean"] for r in results] == [float(v) for v in range(7)]
    assert fn.sizes == [3, 3, 1]


def test_requests_arriving_during_a_batch_form_the_next_one() -> None:
    fn = Recorder(delay_s=0.1)

    async def body(batcher: MicroBatcher) -> None:
        first = asyncio.ensure_future(batcher.submit(image(1)))
        await asyncio.sleep(0.03)  # the first batch (of one) is computing now
        await asyncio.gather(first, *(batcher.submit(image(v)) for v in range(5)))

    run_with_batcher(fn, body, max_batch_size=32, max_wait_s=0.0)
    assert fn.sizes == [1, 5]


def test_a_failing_batch_fails_its_requests_only() -> None:
    fn = Recorder(fail=True)

    async def body(batcher: MicroBatcher) -> list[object]:
        failed = await asyncio.gather(
            *(batcher.submit(image(v)) for v in range(3)), return_exceptions=True
        )
        fn.fail = False
        return [*failed, await batcher.submit(image(4))]

    results = run_with_batcher(fn, body, max_batch_size=8, max_wait_s=0.02)
    assert all(isinstance(r, RuntimeError) for r in results[:3])
    assert results[3] == {"mean": 4.0}


def test_disabled_batcher_calls_one_by_one() -> None:
    fn = Recorder()

    async def body(batcher: MicroBatcher) -> list[dict[str, float]]:
        return await asyncio.gather(*(batcher.submit(image(v)) for v in range(4)))

    run_with_batcher(fn, body, max_batch_size=8, max_wait_s=0.05, enabled=False)
    assert fn.sizes == [1, 1, 1, 1]


def test_stop_finishes_queued_work_then_refuses() -> None:
    fn = Recorder(delay_s=0.02)

    async def main() -> tuple[list[dict[str, float]], bool]:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(fn, executor=pool, max_batch_size=2, max_wait_s=0.01)
            await batcher.start()
            pending = asyncio.ensure_future(batcher.submit_many([image(v) for v in range(5)]))
            await asyncio.sleep(0)
            await batcher.stop()
            try:
                await batcher.submit(image(9))
                refused = False
            except BatcherClosed:
                refused = True
            return await pending, refused

    results, refused = asyncio.run(main())
    assert [r["mean"] for r in results] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert refused and sum(fn.sizes) == 5


def test_bad_parameters() -> None:
    with pytest.raises(ValueError, match="max_batch_size must be >= 1, got 0"):
        MicroBatcher(Recorder(), executor=ThreadPoolExecutor(1), max_batch_size=0, max_wait_s=0)
