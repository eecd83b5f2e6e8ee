"""HTTP protocol edges of the service: HEAD, metric labels that clients cannot inflate,
body timeouts, and sampling that neither starves scoring nor outlives its client.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.cancellation import ShutdownDeadline, step_check, unless_stopped
from service.errors import ClientGone, ProblemError
from service.middleware import MAX_JSON_BYTES, BodyLimitsMiddleware, route_template
from tests.test_service_api import assert_problem, png, settings_for


@pytest.fixture(scope="module")
def client(tiny_checkpoint: Path) -> Iterator[TestClient]:
    settings = settings_for(tiny_checkpoint, sample_max_steps=40, sample_max_concurrent=1)
    with TestClient(create_app(settings)) as client:
        yield client


def request_counts(client: TestClient) -> dict[tuple[str, str, str], float]:
    """vaebm_http_requests_total by (method, route, status)."""
    families = text_string_to_metric_families(client.get("/metrics").text)
    family = next(f for f in families if f.name == "vaebm_http_requests")
    return {
        (s.labels["method"], s.labels["route"], s.labels["status"]): s.value
        for s in family.samples
        if s.name == "vaebm_http_requests_total"
    }


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/model", "/reference-sets"])
def test_every_get_route_answers_head(client: TestClient, path: str) -> None:
    get = client.get(path)
    head = client.head(path)
    assert get.status_code == head.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]


def test_head_routes_stay_out_of_the_openapi_schema(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "head" not in paths["/healthz"] and "get" in paths["/healthz"]


def test_a_trailing_slash_is_a_404_not_a_redirect(client: TestClient) -> None:
    response = client.get("/healthz/", headers={"Host": "evil.example"}, follow_redirects=False)
    assert_problem(response, 404, "no route matches GET /healthz/; see /docs for the API")
    assert "location" not in response.headers


def test_unknown_methods_share_one_metric_label(client: TestClient) -> None:
    """A client inventing methods cannot grow the registry: they all count as "other"."""
    for method in ("QWERTY", "BREW", "PROPFIND"):
        assert client.request(method, "/healthz").status_code == 405
    counts = request_counts(client)
    methods = {method for method, _, _ in counts}
    assert {"QWERTY", "BREW", "PROPFIND"}.isdisjoint(methods)
    assert counts[("other", "/healthz", "405")] == 3


def test_requests_refused_before_routing_count_under_their_route(client: TestClient) -> None:
    """A declared size over the limit is refused by middleware, before routing."""
    before = request_counts(client).get(("POST", "/score", "413"), 0)
    response = client.post("/score", content=b"x", headers={"Content-Length": str(10**12)})
    assert response.status_code == 413
    client.post("/no-such-path", content=b"x", headers={"Content-Length": str(10**12)})
    counts = request_counts(client)
    assert counts[("POST", "/score", "413")] == before + 1
    assert not any(route == "/no-such-path" for _, route, _ in counts)


def test_route_labels_of_unrouted_requests(client: TestClient) -> None:
    """Behind a proxy prefix (root_path) the API's path still counts; other paths never."""
    app = client.app
    assert route_template({"path": "/score", "app": app}) == "/score"
    assert route_template({"path": "/api/score", "root_path": "/api", "app": app}) == "/score"
    assert route_template({"path": "/api/nope", "root_path": "/api", "app": app}) == "unmatched"
    assert route_template({"path": "/etc/passwd", "app": app}) == "unmatched"


def posted(body: bytes) -> dict:
    """The ASGI scope of a POST /score of ``body``: a request with a body says so, by
    Content-Length (here) or chunked encoding."""
    return {
        "type": "http",
        "method": "POST",
        "path": "/score",
        "headers": [(b"content-length", str(len(body)).encode())],
    }


def test_a_body_that_stops_arriving_gets_a_408() -> None:
    """BodyLimitsMiddleware on its own: the second piece of the body comes only 100
    timeouts later. Timers on one event loop fire in deadline order, so the middleware's
    timeout comes first however busy the machine: no clock is read here."""
    read_all = []
    waits = []

    async def app(scope: dict, receive, send) -> None:  # reads the body, then answers
        while (await receive()).get("more_body"):
            pass
        read_all.append(True)

    timeout_s = 0.05
    middleware = BodyLimitsMiddleware(app, max_bytes=1000, timeout_s=timeout_s)
    pieces = [
        {"type": "http.request", "body": b"def", "more_body": False},
        {"type": "http.request", "body": b"abc", "more_body": True},
    ]
    sent: list[dict] = []

    async def receive() -> dict:
        piece = pieces.pop()
        if not pieces:  # the client went quiet before its last piece
            try:
                await asyncio.sleep(100 * timeout_s)
            except asyncio.CancelledError:
                waits.append("given up")
                raise
            waits.append("waited for it")
        return piece

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(middleware(posted(b"abcdef"), receive, send))
    assert waits == ["given up"] and read_all == []
    assert sent[0]["status"] == 408
    assert (b"connection", b"close") in sent[0]["headers"]
    assert b"VAEBM_BODY_TIMEOUT_S" in sent[1]["body"]


def test_the_timeout_ends_with_the_body() -> None:
    """After the last piece of the body, waiting on receive (for a disconnect) is not timed."""
    waited = []

    async def app(scope: dict, receive, send) -> None:
        await receive()  # the whole body
        waited.append(await receive())  # a disconnect, after longer than the timeout

    middleware = BodyLimitsMiddleware(app, max_bytes=1000, timeout_s=0.01)
    messages = [
        {"type": "http.disconnect"},
        {"type": "http.request", "body": b"abc", "more_body": False},
    ]

    async def receive() -> dict:
        message = messages.pop()
        if message["type"] == "http.disconnect":
            await asyncio.sleep(0.1)
        return message

    async def send(message: dict) -> None:
        raise AssertionError("nothing should be sent")

    asyncio.run(middleware(posted(b"abc"), receive, send))
    assert waited == [{"type": "http.disconnect"}]


def test_samples_beyond_the_concurrency_limit_get_a_429(client: TestClient) -> None:
    state = client.app.state
    state.samples_running = 1  # the module's limit: one sample at a time
    try:
        response = client.post("/sample", json={"n": 1, "steps": 0, "seed": 1})
    finally:
        state.samples_running = 0
    body = assert_problem(
        response,
        429,
        "1 samples are being drawn, the limit (VAEBM_SAMPLE_MAX_CONCURRENT) is 1; retry later",
        "too-many-samples",
    )
    assert body["status"] == 429 and response.headers["retry-after"] == "10"
    assert client.post("/sample", json={"n": 1, "steps": 0, "seed": 1}).status_code == 200
    assert state.samples_running == 0  # the slot is given back


def test_scoring_runs_between_the_steps_of_a_long_sample(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A /score sent while a sample runs is answered before the sample's last step."""
    model = client.app.state.runtime.model
    real = model.langevin
    steps_done: list[int] = []
    first_step = threading.Event()

    def slow_step(*args, **kwargs):
        time.sleep(0.05)  # a step of a large model: 40 steps take 2 s or more
        result = real(*args, **kwargs)
        steps_done.append(1)
        first_step.set()
        return result

    monkeypatch.setattr(model, "langevin", slow_step)
    answers: list[int] = []
    sampler = threading.Thread(
        target=lambda: answers.append(
            client.post("/sample", json={"n": 2, "steps": 40, "seed": 3}).status_code
        )
    )
    sampler.start()
    assert first_step.wait(30)
    response = client.post("/score", files={"file": ("a.png", png(), "image/png")})
    steps_when_scored = len(steps_done)
    sampler.join(60)
    assert response.status_code == 200
    assert answers == [200] and len(steps_done) == 40
    assert steps_when_scored < 40


def test_a_sample_stops_when_its_client_is_gone(client: TestClient) -> None:
    runtime = client.app.state.runtime
    asked: list[int] = []

    async def gone_after_three(done: int) -> None:
        asked.append(done)
        if done == 3:
            raise ClientGone(f"the client left; sampling stopped after {done} of 40 steps")

    async def draw() -> None:
        await runtime.sample_uint8(2, 40, 1e-3, 5, before_step=gone_after_three)

    with pytest.raises(ClientGone, match="sampling stopped after 3 of 40 steps"):
        client.portal.call(draw)
    assert asked == [0, 1, 2, 3]


class FakeRequest:
    """What ``step_check`` and ``unless_stopped`` read of a request: the app's draining
    check (asked with the next step's expected seconds, which it records), the connection."""

    def __init__(self, draining: bool | Callable[[], bool], disconnected: bool) -> None:
        self.asked_with: list[float] = []
        self.draining = draining if callable(draining) else (lambda: draining)
        self.app = SimpleNamespace(state=SimpleNamespace(draining=self.ask))
        self.disconnected = disconnected

    def ask(self, next_step_s: float = 0.0) -> bool:
        self.asked_with.append(next_step_s)
        return self.draining()

    async def is_disconnected(self) -> bool:
        return self.disconnected


@pytest.mark.parametrize(
    ("draining", "disconnected", "expected"),
    [(False, False, None), (False, True, 499), (True, False, 503), (True, True, 503)],
)
def test_step_check_stops_for_a_shutdown_or_a_departed_client(
    draining: bool, disconnected: bool, expected: int | None
) -> None:
    check = step_check(FakeRequest(draining, disconnected), "sampling", 10)  # type: ignore[arg-type]
    if expected is None:
        asyncio.run(check(4))
        return
    with pytest.raises(ProblemError) as caught:
        asyncio.run(check(4))
    assert caught.value.status == expected
    assert "sampling stopped after 4 of 10 steps" in caught.value.detail


def test_work_running_past_the_deadline_is_abandoned_with_a_503() -> None:
    """Under load one Langevin step took up to six seconds: a shutdown whose deadline came
    during it let uvicorn cancel the request (a 500 with a traceback), not a 503."""
    deadline_passed = [False]
    request = FakeRequest(lambda: deadline_passed[0], disconnected=False)

    async def scenario() -> asyncio.Task:
        step = asyncio.ensure_future(asyncio.sleep(60.0))
        asyncio.get_running_loop().call_later(0.3, deadline_passed.__setitem__, 0, True)
        with pytest.raises(ProblemError) as caught:
            work = unless_stopped(request, step, "the sample was not finished")  # type: ignore[arg-type]
            await asyncio.wait_for(work, timeout=10)
        assert caught.value.status == 503
        assert caught.value.detail == (
            "the service is shutting down; the sample was not finished; retry later"
        )
        await asyncio.sleep(0)  # let the cancellation land
        return step

    assert asyncio.run(scenario()).cancelled()


def test_the_shutdown_check_is_told_the_slowest_step_so_far() -> None:
    request = FakeRequest(False, disconnected=False)
    check = step_check(request, "sampling", 3)  # type: ignore[arg-type]

    async def three_steps() -> None:
        for done, seconds in enumerate((0.1, 0.02, 0.0)):
            await check(done)
            await asyncio.sleep(seconds)

    asyncio.run(three_steps())
    first, second, third = request.asked_with
    assert first == 0.0  # nothing measured before the first step
    assert second >= 0.1 and third == second  # the slowest step is kept


@pytest.mark.parametrize(
    ("draining", "disconnected", "expected"), [(False, True, 499), (True, False, 503)]
)
def test_an_abandoned_batch_is_dropped_from_the_queue(
    draining: bool, disconnected: bool, expected: int
) -> None:
    """unless_stopped cancels the submission when the client leaves or the shutdown can
    wait no longer; the batcher skips cancelled images."""

    async def scenario() -> tuple[int, bool, bool]:
        never = asyncio.get_running_loop().create_future()  # a batch that never comes back
        request = FakeRequest(draining, disconnected)
        with pytest.raises(ProblemError) as caught:
            await unless_stopped(request, never)  # type: ignore[arg-type]
        return caught.value.status, never.cancelled(), never.done()

    assert asyncio.run(scenario()) == (expected, True, True)


def test_work_is_cancelled_with_the_request_that_waits_for_it() -> None:
    """When the server cancels a request (the end of its grace period), the batch or step
    it waited for is cancelled too, not left pending to be scored for nobody."""

    async def scenario() -> bool:
        never = asyncio.get_running_loop().create_future()
        request = FakeRequest(False, disconnected=False)
        waiting = asyncio.ensure_future(unless_stopped(request, never))  # type: ignore[arg-type]
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        return never.cancelled()

    assert asyncio.run(scenario())


def test_steps_one_at_a_time_give_the_same_sample(client: TestClient) -> None:
    """The service's step-by-step sampler draws what VAEBM.sample draws: the same random
    stream in the same order, so the same images up to float rounding (the two run on
    different threads, where CPU kernels may split sums differently): one grey level."""
    import numpy as np

    from model.likelihood import to_uint8

    runtime = client.app.state.runtime

    async def draw() -> np.ndarray:
        return await runtime.sample_uint8(3, 5, 1e-3, 11)

    stepped = client.portal.call(draw)
    whole = to_uint8(runtime.model.sample(3, steps=5, step_size=1e-3, seed=11)).cpu().numpy()
    assert stepped.shape == whole.shape == (3, 1, 28, 28)
    assert np.abs(stepped.astype(int) - whole.astype(int)).max() <= 1
    other_seed = to_uint8(runtime.model.sample(3, steps=5, step_size=1e-3, seed=12)).cpu().numpy()
    assert np.abs(stepped.astype(int) - other_seed.astype(int)).max() > 1


def test_a_shutdown_deadline_lets_work_finish_until_shortly_before_the_cancel() -> None:
    now = [100.0]
    requested: list[float | None] = [None]
    deadline = ShutdownDeadline(lambda: requested[0], grace_s=30.0, clock=lambda: now[0])
    assert not deadline() and not deadline(next_step_s=40.0)  # no shutdown asked for
    requested[0] = now[0] - 2.0  # SIGTERM came 2 s ago: 27 s left for the work
    assert not deadline()
    now[0] += 26.9
    assert not deadline()
    now[0] += 0.1
    assert deadline()  # one second before uvicorn would cancel
    now[0] -= 10.0  # 10 s left before the margin: a 10 s step would not end in time
    assert not deadline(next_step_s=9.9) and deadline(next_step_s=10.0)


def test_the_server_notes_when_it_was_asked_to_stop() -> None:
    """The deadline counts from the signal, not from the first check after it (a step
    later, and a step took up to six seconds under load)."""
    import signal

    import uvicorn

    from service.main import _Server

    server = _Server(uvicorn.Config(lambda scope, receive, send: None))
    assert server.exit_requested_at is None
    before = time.monotonic()
    server.handle_exit(signal.SIGTERM, None)
    first = server.exit_requested_at
    assert server.should_exit and first is not None and before <= first <= time.monotonic()
    server.handle_exit(signal.SIGINT, None)  # a second signal keeps the first time
    assert server.exit_requested_at == first


def test_a_response_sent_before_the_body_was_read_closes_the_connection(
    client: TestClient,
) -> None:
    """Else the server reads and drops the rest of the body, with no limit, to reuse the
    connection: gigabytes, for a 404 or a 415."""
    body = b"x" * 1000
    for response in (
        client.post("/no-such-path", content=body),
        client.post("/score", content=body, headers={"Content-Type": "application/json"}),
    ):
        assert response.status_code in (404, 415)
        assert response.headers["connection"] == "close"
    read = client.post("/score", files={"file": ("a.png", png(), "image/png")})
    assert read.status_code == 200 and "connection" not in read.headers
    assert "connection" not in client.get("/healthz").headers


def test_json_bodies_have_a_small_limit(client: TestClient) -> None:
    big = b'{"n": 1, "pad": "' + b"x" * (MAX_JSON_BYTES + 1) + b'"}'
    response = client.post("/sample", content=big, headers={"Content-Type": "application/json"})
    assert_problem(
        response,
        413,
        f"the request declares {len(big)} bytes, above the limit of {MAX_JSON_BYTES} bytes "
        "(the limit for JSON bodies); send fewer or smaller files",
        "request-too-large",
    )


def test_every_content_encoding_header_line_counts(client: TestClient) -> None:
    headers = [("Content-Encoding", "identity"), ("Content-Encoding", "gzip")]
    response = client.post("/sample", json={"n": 1, "steps": 0}, headers=headers)
    assert_problem(
        response,
        415,
        "Content-Encoding 'identity, gzip' is not supported; send the body uncompressed",
        "unsupported-media-type",
    )


def test_the_docs_count_under_their_own_route(client: TestClient) -> None:
    assert client.get("/openapi.json").status_code == 200
    assert request_counts(client)[("GET", "/openapi.json", "200")] >= 1
