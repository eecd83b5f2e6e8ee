"""Security: API keys, constant-time comparison, keys never logged, body limits that hold
over real HTTP (chunked bodies, lying Content-Length), and no pickle loading.

The limit tests talk raw HTTP/1.1 over a socket to a real ``python -m service`` (uvicorn,
h11) on a free loopback port, because the in-process test client always frames the body
itself and cannot lie about its length.
"""

from __future__ import annotations

import ast
import hmac
import io
import json
import logging
import re
import socket
import subprocess
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.settings import Settings
from tests.bad_inputs import multipart, pickle_payload
from tests.test_service_startup import free_port, start_service, wait_ready

REPO = Path(__file__).resolve().parents[1]
KEY = "right-key-0123456789"
OTHER_KEY = "second-key-abcdefgh"
WRONG_KEY = "wrong-key-9876543210"
LIMIT = 200_000  # VAEBM_MAX_UPLOAD_BYTES of every app in this module


def png(value: int = 50) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (28, 28), value).save(buffer, format="PNG")
    return buffer.getvalue()


def settings_for(checkpoint: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "checkpoint": checkpoint,
        "device": "cpu",
        "warmup": False,
        "max_upload_bytes": LIMIT,
        "api_keys": [KEY, OTHER_KEY],
        "sample_max_n": 2,
        "sample_max_steps": 1,
    }
    return Settings(**{**values, **overrides})


@pytest.fixture(scope="module")
def keyed_client(tiny_checkpoint: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(tiny_checkpoint))) as client:
        yield client


# ---------------------------------------------------------------------------------------------
# API keys
# ---------------------------------------------------------------------------------------------

PROTECTED = [
    ("POST", "/score", {"files": {"file": ("a.png", png(), "image/png")}}),
    ("POST", "/score/batch", {"files": [("files", ("a.png", png(), "image/png"))]}),
    ("POST", "/evaluate", {"files": [("files", ("a.png", png(), "image/png"))]}),
    ("POST", "/sample", {"json": {"n": 1, "steps": 0, "seed": 1}}),
    ("GET", "/model", {}),
    ("GET", "/reference-sets", {}),
    ("HEAD", "/model", {}),
    ("HEAD", "/reference-sets", {}),
]


@pytest.mark.parametrize(("method", "path", "kwargs"), PROTECTED, ids=[p for _, p, _ in PROTECTED])
def test_every_protected_route_needs_a_key_in_either_header(
    keyed_client: TestClient, method: str, path: str, kwargs: dict
) -> None:
    refused = [
        {},
        {"X-API-Key": WRONG_KEY},
        {"Authorization": f"Bearer {WRONG_KEY}"},
        {"Authorization": f"Basic {KEY}"},  # the right key in the wrong scheme
        {"Authorization": "Bearer "},
        {"X-API-Key": KEY[:-1]},  # a prefix of a key
        {"X-API-Key": KEY + "x"},  # a key plus one character
        {"Cookie": f"api_key={KEY}"},
        # every key presented must be valid, whichever header holds the wrong one
        {"X-API-Key": KEY, "Authorization": f"Bearer {WRONG_KEY}"},
        {"X-API-Key": WRONG_KEY, "Authorization": f"Bearer {KEY}"},
        {"X-API-Key": KEY, "Authorization": f"Basic {KEY}"},
        # a repeated header: each value counts, whichever comes first
        [("X-API-Key", KEY), ("X-API-Key", WRONG_KEY)],
        [("X-API-Key", WRONG_KEY), ("X-API-Key", KEY)],
        [("X-API-Key", KEY), ("X-API-Key", WRONG_KEY), ("X-API-Key", KEY)],
        [("Authorization", f"Bearer {KEY}"), ("Authorization", f"Bearer {WRONG_KEY}")],
    ]
    for headers in refused:
        response = keyed_client.request(method, path, headers=headers, **kwargs)
        assert response.status_code == 401, (headers, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert response.headers["www-authenticate"] == 'Bearer realm="vaebm-ood"'
        assert KEY not in response.text and WRONG_KEY not in response.text
        assert (response.content == b"") == (method == "HEAD")
    response = keyed_client.request(method, path, params={"api_key": KEY}, **kwargs)
    assert response.status_code == 401  # a key in the query string is not accepted
    accepted = (
        {"X-API-Key": KEY},
        {"Authorization": f"Bearer {OTHER_KEY}"},
        {"X-API-Key": KEY, "Authorization": f"Bearer {OTHER_KEY}"},
    )
    for headers in accepted:
        response = keyed_client.request(method, path, headers=headers, **kwargs)
        assert response.status_code == 200, (headers, response.text)


def test_unauthenticated_upload_is_refused_before_its_body_is_read(tiny_checkpoint: Path) -> None:
    """The key check runs before the body: a client without a key cannot make it stream in."""
    import asyncio

    app = create_app(settings_for(tiny_checkpoint))
    reads = []
    sent = []

    async def receive() -> dict:
        reads.append(1)
        return {"type": "http.request", "body": b"\x00" * 65536, "more_body": True}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/score",
        "raw_path": b"/score",
        "query_string": b"",
        "headers": [(b"content-type", b"multipart/form-data; boundary=x")],
        "app": app,
    }
    asyncio.run(app(scope, receive, send))  # the model is not loaded: the key check comes first
    assert sent[0]["status"] == 401
    assert reads == []


def test_keys_are_compared_with_hmac_compare_digest(
    keyed_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every configured key is compared, with compare_digest, whether the key is right or not."""
    real = hmac.compare_digest
    calls: list[tuple[bytes, bytes]] = []

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)  # service.auth calls hmac.compare_digest
    for given, status in ((KEY, 200), (WRONG_KEY, 401), (OTHER_KEY, 200)):
        calls.clear()
        response = keyed_client.get("/model", headers={"X-API-Key": given})
        assert response.status_code == status
        compared = [(a, b) for a, b in calls if a == given.encode()]
        # No early exit: the candidate meets every configured key, in the middleware (and
        # again in the route's dependency when the middleware let it through).
        assert {b for _, b in compared} == {KEY.encode(), OTHER_KEY.encode()}
        assert len(compared) == (4 if status == 200 else 2)


def test_no_secret_is_compared_with_a_plain_operator() -> None:
    """service/auth.py compares keys only through hmac.compare_digest, never with == or in."""
    tree = ast.parse((REPO / "service" / "auth.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            text = ast.unparse(node)
            assert "get_secret_value" not in text and "candidate" not in text, text


def test_keys_are_not_logged_in_process(
    keyed_client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    files = {"file": ("a.png", png(), "image/png")}
    keyed_client.post("/score", files=files, headers={"X-API-Key": KEY})
    keyed_client.post("/score", files=files, headers={"Authorization": f"Bearer {KEY}"})
    keyed_client.post("/score", files=files, headers={"X-API-Key": WRONG_KEY})
    keyed_client.get("/model", headers={"Authorization": f"Bearer {WRONG_KEY}"})
    text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert caplog.records  # the access log did log these requests
    for secret in (KEY, WRONG_KEY):
        assert secret not in text


# ---------------------------------------------------------------------------------------------
# a real server: limits over raw HTTP, keys in its logs
# ---------------------------------------------------------------------------------------------


@dataclass
class Server:
    port: int
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "stderr.log"
    settings = {
        "VAEBM_API_KEYS": f"{KEY},{OTHER_KEY}",
        "VAEBM_MAX_UPLOAD_BYTES": str(LIMIT),
        "VAEBM_LOG_LEVEL": "DEBUG",  # the most verbose the service gets
        "VAEBM_WARMUP": "false",
    }
    with log.open("w") as stderr:
        process = start_service(tiny_checkpoint, port, settings, stderr)
    try:
        process.stderr = log.open()  # wait_ready reads it when the server dies early
        wait_ready(f"http://127.0.0.1:{port}", process)
        yield Server(port, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stderr.close()


@dataclass
class Exchange:
    received: bytes
    closed_by_server: bool

    @property
    def statuses(self) -> list[int]:
        return [int(s) for s in re.findall(rb"HTTP/1\.1 (\d{3}) ", self.received)]

    def first_json(self) -> dict:
        head, _, rest = self.received.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
        return json.loads(rest[:length])


def exchange(port: int, head: bytes, body: Iterable[bytes] = (), timeout: float = 20.0) -> Exchange:
    """Send ``head`` then ``body`` while reading; stop when the server closes or goes quiet.

    Sending runs on its own thread and stops quietly if the server has closed the
    connection (it may refuse a body before the client has finished sending it).
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def sender() -> None:
        try:
            sock.sendall(head)
            for chunk in body:
                sock.sendall(chunk)
        except OSError:  # the server closed the connection: fine, and what we test for
            pass

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    received = b""
    closed = False
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                closed = True
                break
            received += data
    except TimeoutError:
        pass
    except ConnectionResetError:
        closed = True
    thread.join(timeout=timeout)
    sock.close()
    return Exchange(received, closed)


BOUNDARY_TYPE = b"multipart/form-data; boundary=vaebm-bad-inputs"


def request_head(extra: bytes, *, key: str = KEY, path: bytes = b"/score") -> bytes:
    return (
        b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"X-API-Key: " + key.encode() + b"\r\n"
        b"Content-Type: " + BOUNDARY_TYPE + b"\r\n" + extra + b"\r\n"
    )


def chunked(body: bytes, size: int = 16_384) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        piece = body[start : start + size]
        yield b"%x\r\n" % len(piece) + piece + b"\r\n"
    yield b"0\r\n\r\n"


def score_requests(server: Server) -> int:
    """How many /score requests reached the app so far (from its /metrics)."""
    sock = exchange(
        server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", timeout=10
    )
    text = sock.received.decode(errors="replace")
    return sum(
        int(float(m))
        for m in re.findall(r'vaebm_http_requests_total\{[^}]*route="/score"[^}]*\} (\S+)', text)
    )


def test_chunked_upload_within_the_limit_is_scored(server: Server) -> None:
    """Control: the raw-socket client and chunked framing work."""
    body = multipart([("file", "a.png", png(), "image/png")])
    result = exchange(
        server.port,
        request_head(b"Transfer-Encoding: chunked\r\nConnection: close\r\n"),
        chunked(body),
    )
    assert result.statuses == [200], result.received[:500]
    assert result.first_json()["image"]["filename"] == "a.png"


def test_chunked_upload_above_the_limit_gets_413_and_the_connection_closes(
    server: Server,
) -> None:
    body = multipart([("file", "big.png", b"\x00" * (LIMIT + 1), "image/png")])
    result = exchange(server.port, request_head(b"Transfer-Encoding: chunked\r\n"), chunked(body))
    assert result.statuses == [413], result.received[:500]
    problem = result.first_json()
    assert problem["type"] == "urn:vaebm-ood:problem:request-too-large"
    assert problem["detail"].startswith(f"the request body exceeds the limit of {LIMIT} bytes")
    assert b"connection: close" in result.received.lower()
    assert result.closed_by_server  # no keep-alive: the rest of the body is not read


def test_chunked_upload_with_a_small_content_length_too_gets_413(server: Server) -> None:
    """Both framings at once (a smuggling classic): the body is counted as it arrives."""
    body = multipart([("file", "big.png", b"\x00" * (LIMIT + 1), "image/png")])
    head = request_head(b"Content-Length: 10\r\nTransfer-Encoding: chunked\r\n")
    result = exchange(server.port, head, chunked(body))
    # h11 frames the body by Transfer-Encoding (RFC 9112 section 6.3) and ignores the
    # Content-Length, so the byte count sees the whole body.
    assert result.statuses == [413], result.received[:500]
    assert result.closed_by_server


def test_content_length_smaller_than_the_body_lets_no_more_than_it_through(
    server: Server,
) -> None:
    """A short Content-Length with a large body: the app gets only Content-Length bytes.

    The upload (over the limit) is cut after 1000 bytes, so the app sees a truncated
    multipart body (422: no file in it); the rest is not a body but garbage where the
    next request should start, which uvicorn refuses with 400 before closing the
    connection. The app handled exactly one request.
    """
    before = score_requests(server)
    body = multipart([("file", "a.png", png() + b"\x00" * (LIMIT + 1), "image/png")])
    result = exchange(server.port, request_head(b"Content-Length: 1000\r\n"), [body])
    assert result.statuses == [422, 400], result.received[:800]
    assert result.first_json()["detail"] == "body.file: Field required"
    assert result.closed_by_server
    assert score_requests(server) == before + 1


def test_declared_content_length_above_the_limit_is_refused_without_the_body(
    server: Server,
) -> None:
    head = request_head(b"Content-Length: %d\r\n" % (50 * LIMIT))
    result = exchange(server.port, head, timeout=10)  # the body never comes
    assert result.statuses == [413], result.received[:500]
    assert result.first_json()["detail"].startswith(f"the request declares {50 * LIMIT} bytes")
    assert result.closed_by_server


@pytest.mark.parametrize(
    "header",
    [b"Content-Length: +1000\r\n", b"Content-Length: 10\r\nContent-Length: 900000\r\n"],
    ids=["signed", "duplicate"],
)
def test_malformed_content_length_is_refused_by_the_server(server: Server, header: bytes) -> None:
    body = multipart([("file", "a.png", png() + b"\x00" * (LIMIT + 1), "image/png")])
    result = exchange(server.port, request_head(header), [body])
    assert result.statuses == [400], result.received[:500]
    assert result.closed_by_server


def test_the_server_is_fine_after_the_limit_tests_and_never_logged_a_key(server: Server) -> None:
    ready = exchange(server.port, b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert ready.statuses == [200]
    # Authenticated and refused requests, with both headers, then read the DEBUG log.
    ok = multipart([("file", "a.png", png(), "image/png")])
    for key, status in ((KEY, 200), (WRONG_KEY, 401)):
        head = request_head(b"Content-Length: %d\r\nConnection: close\r\n" % len(ok), key=key)
        assert exchange(server.port, head, [ok]).statuses == [status]
    bearer = (
        b"GET /model HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Authorization: Bearer " + WRONG_KEY.encode() + b"\r\n\r\n"
    )
    assert exchange(server.port, bearer).statuses == [401]
    log = server.log_text()
    assert '"status": 401' in log and '"status": 200' in log  # the requests were logged
    assert '"status": 5' not in log  # and nothing in this module got a 5xx
    for secret in (KEY, OTHER_KEY, WRONG_KEY):
        assert secret not in log


# ---------------------------------------------------------------------------------------------
# pickles
# ---------------------------------------------------------------------------------------------

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve"}


def _calls(tree: ast.AST, dotted: str) -> Iterator[ast.Call]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == dotted:
            yield node


def _keyword(call: ast.Call, name: str) -> object:
    for kw in call.keywords:
        if kw.arg == name:
            return ast.literal_eval(kw.value)
    return None


def test_no_code_loads_pickles() -> None:
    """service/, model/ and training/ never import a pickle module, and every torch.load /
    numpy.load refuses pickles (weights_only=True, allow_pickle not True)."""
    sources = sorted(p for d in ("service", "model", "training") for p in (REPO / d).rglob("*.py"))
    assert len(sources) > 20
    for path in sources:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {(node.module or "").split(".")[0]}
            else:
                continue
            assert not names & PICKLE_MODULES, f"{path}:{node.lineno} imports {names}"
        for call in _calls(tree, "torch.load"):
            assert _keyword(call, "weights_only") is True, f"{path}:{call.lineno}"
        for name in ("np.load", "numpy.load"):
            for call in _calls(tree, name):
                assert _keyword(call, "allow_pickle") is not True, f"{path}:{call.lineno}"
        assert "read_pickle" not in path.read_text(), path


def test_uploaded_pickles_are_never_unpickled(
    keyed_client: TestClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Pickle, .npy (object array) and torch .pt uploads get a 4xx; nothing unpickles them."""
    import pickle

    import numpy as np
    import torch

    marker = tmp_path / "pickle-was-loaded"
    npy = io.BytesIO()
    np.save(npy, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    pt = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, pt)
    uploads = {
        "payload.pkl": pickle_payload(str(marker)),
        "array.npy": npy.getvalue(),
        "weights.pt": pt.getvalue(),
    }
    loads: list[str] = []

    def forbid(name: str):
        def loader(*args: object, **kwargs: object) -> object:
            loads.append(name)
            raise AssertionError(f"{name} called while serving a request")

        return loader

    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load"), (np, "load")):
        monkeypatch.setattr(module, name, forbid(f"{module.__name__}.{name}"))
    headers = {"X-API-Key": KEY}
    for filename, data in uploads.items():
        for media in ("application/octet-stream", "image/png"):
            one = keyed_client.post(
                "/score", files={"file": (filename, data, media)}, headers=headers
            )
            assert one.status_code == 422, (filename, one.text)
            assert one.json()["type"] == "urn:vaebm-ood:problem:undecodable-image"
        batch = keyed_client.post(
            "/score/batch", files=[("files", (filename, data, "image/png"))], headers=headers
        )
        assert batch.status_code == 200 and batch.json()["results"][0]["status"] == 422
        evaluate = keyed_client.post(
            "/evaluate", files=[("files", (filename, data, "image/png"))], headers=headers
        )
        assert evaluate.status_code == 422, evaluate.text
    assert loads == []
    assert not marker.exists()
