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
POLL_S = 0.25  # how often a waiting request looks for its client
DEADLINE_MARGIN_S = 1.0  # stop this long before the server would cancel the request


class ShutdownDeadline:
    """True once a shutdown has run so long that the server will soon cancel its requests.

    On SIGTERM uvicorn waits ``grace_s`` for in-flight requests, then cancels them (a
    500 with a traceback). Work that checks this between steps finishes if it can within
    the grace period, and otherwise stops a margin before its end with a 503. The
    shutdown's start is noticed on the first check after it (checks come once a step).
    """

    def __init__(
        self,
        shutting_down: Callable[[], bool],
        grace_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.shutting_down = shutting_down
        self.grace_s = grace_s
        self.clock = clock
        self.since: float | None = None

    def __call__(self) -> bool:
        if not self.shutting_down():
            return False
        if self.since is None:
            self.since = self.clock()
        return self.clock() - self.since >= max(0.0, self.grace_s - DEADLINE_MARGIN_S)


def step_check(request: Request, what: str, total: int) -> Callable[[int], Awaitable[None]]:
    """A check to call before each of ``total`` steps: raises ShuttingDown when a shutdown
    cannot wait any longer (``app.state.draining``, a :class:`ShutdownDeadline` under
    ``vaebm serve``) and ClientGone once the client has disconnected."""

    async def check(done: int) -> None:
        progress = f"{what} stopped after {done} of {total} steps"
        if request.app.state.draining():
            raise ShuttingDown(f"the service is shutting down; {progress}; retry later")
        if await request.is_disconnected():
            raise ClientGone(f"the client left; {progress}")

    return check


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """``await work``, but cancel it and raise ClientGone if the client disconnects.

    Cancelling a micro-batcher submission cancels its images' futures, and the batcher
    skips images whose future is done: what has not run yet never runs.
    """
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=POLL_S)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise ClientGone("the client left; its images not yet scored were dropped")
