"""Over real HTTP: abandoned batches, an unread 60 MB body after a 401, SIGTERM mid-sample.

Starts ``vaebm serve`` (API keys on, a 5 s graceful timeout) on ``--port`` and prints:

- how long a ``/score`` takes right after four 256-image ``/score/batch`` requests whose
  clients gave up after 0.3 s (their queued images must be dropped);
- whether a 401 to a request declaring a 60 MB body (under the upload limit, so only
  the key check refuses it) closes the connection, and after how many more bytes the
  server stops reading;
- what two 64-sample, 200-step ``/sample`` requests get when SIGTERM comes 2 s in, how
  long the server takes to exit, and how many tracebacks it logged.

``--busy-loops N`` runs N processes that spin on the CPU for the whole run, to see the
shutdown on a machine too busy for the sampling steps to keep their pace (three on a
two-core machine made a step take one to six seconds).

    python benchmarks/abandon_and_drain.py --port 8035 [--busy-loops 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

KEY = "key-one-0123456789"
HEADERS = {"X-API-Key": KEY}
VAEBM = str(Path(sys.executable).with_name("vaebm"))


def start_server(port: int) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "VAEBM_PORT": str(port),
        "VAEBM_API_KEYS": KEY,
        "VAEBM_GRACEFUL_TIMEOUT_S": "5",
    }
    process = subprocess.Popen(
        [VAEBM, "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    for _ in range(240):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit("the server did not become ready")


def gray_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (28, 28), 40).save(buffer, format="PNG")
    return buffer.getvalue()


def in_threads(fn, count: int) -> list[threading.Thread]:
    threads = [threading.Thread(target=fn) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads


def abandoned_batches(base: str, png: bytes) -> None:
    files = [("files", (f"{i}.png", png, "image/png")) for i in range(256)]

    def abandon() -> None:
        with contextlib.suppress(httpx.TimeoutException):
            httpx.post(f"{base}/score/batch", files=files, headers=HEADERS, timeout=0.3)

    for thread in in_threads(abandon, 4):
        thread.join()
    started = time.perf_counter()
    response = httpx.post(
        f"{base}/score", files={"file": ("a.png", png, "image/png")}, headers=HEADERS, timeout=60
    )
    seconds = time.perf_counter() - started
    print(f"/score after 4 abandoned batches: {response.status_code} in {seconds:.2f} s")


def unread_body_after_401(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(10)
        head = (
            "POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
            "boundary=B\r\nContent-Length: 60000000\r\n\r\n"
        )
        sock.sendall(head.encode() + b"x" * 65536)
        answer = sock.recv(4096)
        closes = b"connection: close" in answer.lower()
        status_line = answer.split(b"\r\n")[0].decode()
        print(f"answer: {status_line}, Connection: close {closes}")
        sent = 0
        try:
            for _ in range(900):  # up to 59 MB more: the whole declared body
                sock.sendall(b"x" * 65536)
                sent += 65536
        except OSError as exc:
            print(f"the server closed the socket after {sent} more bytes ({type(exc).__name__})")
        else:
            print(f"the server was still reading after {sent} more bytes")


def sigterm_during_samples(base: str, process: subprocess.Popen[str]) -> None:
    outcomes: list[object] = []

    def long_sample() -> None:
        body = {"n": 64, "steps": 200}
        try:
            outcomes.append(
                httpx.post(f"{base}/sample", json=body, headers=HEADERS, timeout=60).status_code
            )
        except httpx.HTTPError as exc:
            outcomes.append(type(exc).__name__)

    threads = in_threads(long_sample, 2)
    time.sleep(2)
    process.send_signal(signal.SIGTERM)
    signalled = time.perf_counter()
    for thread in threads:
        thread.join()
    _, stderr = process.communicate(timeout=60)
    seconds = time.perf_counter() - signalled
    print(
        f"samples at SIGTERM: {outcomes}; exit {process.returncode} {seconds:.1f} s after "
        f"the signal; tracebacks logged: {stderr.count('Traceback')}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8035)
    parser.add_argument("--busy-loops", type=int, default=0, help="CPU-spinning processes")
    args = parser.parse_args()
    base = f"http://127.0.0.1:{args.port}"
    spin = "while True: pass"
    started: list[subprocess.Popen] = []  # the busy loops, then the server
    try:  # a server that never gets ready must not leave the busy loops spinning
        for _ in range(args.busy_loops):
            started.append(subprocess.Popen([sys.executable, "-c", spin]))
        started.append(process := start_server(args.port))
        abandoned_batches(base, gray_png())
        unread_body_after_401(args.port)
        sigterm_during_samples(base, process)
    finally:
        for running in started:
            if running.poll() is None:
                running.kill()


if __name__ == "__main__":
    main()
