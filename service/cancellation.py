"""Stopping work whose client has left, or that the shutdown cannot wait for.

uvicorn does not cancel a request's task when its client disconnects: the route runs to
its end, holding the one model thread. Long work therefore checks, and stops with a
problem (:class:`~service.errors.ClientGone`, 499 in logs and metrics;
:class:`~service.errors.ShuttingDown`, 503) instead of computing for nobody.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from fastapi import Request

from service.errors import ClientGone, ShuttingDown

T = TypeVar("T")
POLL_S = 0.25  # how often waiting work looks for its client and the shutdown deadline
DEADLINE_MARGIN_S = 1.0  # stop this long before the server would cancel the request


class ShutdownDeadline:
    """Whether long work must stop now to end before the server cancels it at shutdown.

    On SIGTERM uvicorn waits ``grace_s`` for in-flight requests, then cancels them (a
    500 with a traceback). Work asks this before each step, telling how long a step
    takes, and while it waits for one: it finishes if it can within the grace period, and
    otherwise stops with a 503 a margin before the period ends, without starting a step
    that would not end in time.

    Parameters
    ----------
    shutdown_requested_at : callable
        Returns the ``clock()`` time at which the shutdown was asked for, or None.
    grace_s : float
        The server's graceful-shutdown wait, seconds.
    clock : callable
        Monotonic seconds.
    """

    def __init__(
        self,
        shutdown_requested_at: Callable[[], float | None],
        grace_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.shutdown_requested_at = shutdown_requested_at
        self.grace_s = grace_s
        self.clock = clock

    def __call__(self, next_step_s: float = 0.0) -> bool:
        requested = self.shutdown_requested_at()
        if requested is None:
            return False
        finished = self.clock() - requested + next_step_s
        return finished >= max(0.0, self.grace_s - DEADLINE_MARGIN_S)


async def await_unless(work: Awaitable[T], stop: Callable[[], Awaitable[Exception | None]]) -> T:
    """``await work``, asking ``stop()`` every POLL_S while it runs; when that returns an
    exception, cancel the work and raise it.

    Cancelling a job of the model thread that has not started removes it from the queue;
    one already running finishes there, unseen. Cancelling a micro-batcher submission
    cancels its images' futures, and the batcher skips images whose future is done.
    The work is cancelled too when this is (the server cancels a request at the end of
    its grace period) or when ``stop()`` raises: it is never left running for nobody.
    """
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=POLL_S)
            if done:
                return task.result()
            reason = await stop()
            if reason is not None:
                raise reason
    finally:
        task.cancel()  # nothing for finished work


def step_check(request: Request, what: str, total: int) -> Callable[[int], Awaitable[None]]:
    """A check to call before each of ``total`` steps: raises ShuttingDown (503) when a
    shutdown cannot wait for one more step and ClientGone (499) once the client has
    disconnected, saying how far the work got.

    The shutdown check (``app.state.draining``, a :class:`ShutdownDeadline` under ``vaebm
    serve``) is told the slowest step so far, the time from one check to the next: a step
    waits its turn on the model thread behind other requests' jobs, and on a busy two-core
    machine steps of two concurrent samples took from one to six seconds. A step that runs
    longer than that is stopped by :func:`unless_stopped` around the whole work.
    """
    slowest_step_s = 0.0
    last_check: float | None = None

    async def check(done: int) -> None:
        nonlocal slowest_step_s, last_check
        now = time.monotonic()
        if last_check is not None:
            slowest_step_s = max(slowest_step_s, now - last_check)
        last_check = now
        progress = f"{what} stopped after {done} of {total} steps"
        if request.app.state.draining(slowest_step_s):
            raise ShuttingDown(f"the service is shutting down; {progress}; retry later")
        if await request.is_disconnected():
            raise ClientGone(f"the client left; {progress}")

    return check


async def unless_stopped(
    request: Request, work: Awaitable[T], unfinished: str = "the images not yet scored were dropped"
) -> T:
    """``await work``, but cancel it (see :func:`await_unless`) and raise ClientGone if the
    client disconnects, or ShuttingDown when a shutdown can wait no longer (work queued
    behind a long job would otherwise be cancelled by the server: a 500). ``unfinished``
    says in the problem's detail what was given up."""

    async def stop() -> Exception | None:
        if request.app.state.draining():
            return ShuttingDown(f"the service is shutting down; {unfinished}; retry later")
        if await request.is_disconnected():
            return ClientGone(f"the client left; {unfinished}")
        return None

    return await await_unless(work, stop)
