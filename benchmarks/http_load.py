"""Shared helpers of the HTTP benchmarks: a bounded asyncio + httpx load generator and a
real server subprocess on a free loopback port.

The load generator sends at most ``n`` requests with at most ``concurrency`` in flight,
stops issuing new ones after ``max_seconds``, and records every request's latency, status
and transport error. It only talks to loopback addresses. Request bodies are multipart
payloads encoded once up front (:func:`multipart_body`), so that the client spends its
CPU on HTTP, not on re-encoding the same upload.

:class:`ServerProcess` starts a command (``python -m service ...`` or a bare uvicorn app)
on ``127.0.0.1``, waits for a readiness URL, reads the resident memory of the process from
``/proc/<pid>/status`` and stops it with SIGTERM.

Used by ``benchmarks/service_bench.py`` and ``benchmarks/load_test.py``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import os
import signal
import socket
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import httpx

LOOPBACK_NAMES = ("localhost",)


# ---------------------------------------------------------------------------------------------
# requests
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Upload:
    """One prepared POST: path, body bytes, content type, and how many images it carries."""

    path: str
    body: bytes
    content_type: str
    images: int = 1
    kind: str = "score"


def multipart_body(field_name: str, files: Sequence[tuple[str, bytes, str]]) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body with one part per ``(filename, data, mime)`` under
    ``field_name``; returns ``(body, content_type)``."""
    boundary = uuid.uuid4().hex
    parts = []
    for filename, data, mime in files:
        head = (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="{field_name}"; filename="{filename}"\r\n'
            f"Content-Type: {mime}\r\n\r\n"
        ).encode()
        parts.append(head + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def single_upload(png: bytes, name: str = "image.png", path: str = "/score") -> Upload:
    body, content_type = multipart_body("file", [(name, png, "image/png")])
    return Upload(path, body, content_type, images=1, kind="score")


def batch_upload(pngs: Sequence[bytes], path: str = "/score/batch") -> Upload:
    files = [(f"image-{i}.png", png, "image/png") for i, png in enumerate(pngs)]
    body, content_type = multipart_body("files", files)
    return Upload(path, body, content_type, images=len(pngs), kind="batch")


def uploads(
    pngs: Sequence[bytes], batch_size: int, n_batches: int
) -> tuple[list[Upload], list[Upload]]:
    """One single-image upload per PNG, and ``n_batches`` batch uploads of ``batch_size``
    PNGs each, cycling through the PNGs."""
    singles = [single_upload(png, f"image-{i}.png") for i, png in enumerate(pngs)]
    batches = [
        batch_upload([pngs[(j * batch_size + i) % len(pngs)] for i in range(batch_size)])
        for j in range(n_batches)
    ]
    return singles, batches


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class Record:
    """One request: what it was, when it started (s since the run began), how long it took."""

    kind: str
    images: int
    started: float
    latency: float
    status: int | None  # None: no HTTP response (transport error)
    error: str | None = None
    body_sent_at: float | None = None  # s since the run began, when tracing was on


@dataclass
class LoadResult:
    """Every request of one load run; ``started`` is the run's ``time.perf_counter()`` origin."""

    concurrency: int
    wall_s: float
    started: float = 0.0
    records: list[Record] = field(default_factory=list)
    stopped_by_time: bool = False

    def select(self, kind: str | None = None) -> list[Record]:
        return [r for r in self.records if kind is None or r.kind == kind]

    def summary(self, kind: str | None = None) -> dict[str, Any]:
        """Counts, statuses, throughput and latency percentiles (ms) of the run or one kind."""
        records = self.select(kind)
        ok = [r for r in records if r.status is not None and 200 <= r.status < 300]
        latencies = [r.latency for r in ok]
        statuses = Counter(str(r.status) if r.status is not None else "error" for r in records)
        errors = Counter(r.error for r in records if r.error)
        wall = max(self.wall_s, 1e-9)
        return {
            "requests": len(records),
            "ok": len(ok),
            "status_counts": dict(sorted(statuses.items())),
            "server_errors_5xx": sum(1 for r in records if r.status and r.status >= 500),
            "transport_errors": sum(1 for r in records if r.status is None),
            "error_kinds": dict(errors.most_common(5)),
            "images_ok": sum(r.images for r in ok),
            "wall_s": self.wall_s,
            "requests_per_s": len(ok) / wall,
            "images_per_s": sum(r.images for r in ok) / wall,
            "latency_ms": {
                "mean": 1000 * sum(latencies) / len(latencies) if latencies else math.nan,
                "p50": 1000 * percentile(latencies, 50),
                "p90": 1000 * percentile(latencies, 90),
                "p99": 1000 * percentile(latencies, 99),
                "max": 1000 * max(latencies) if latencies else math.nan,
            },
            "concurrency": self.concurrency,
            "stopped_by_time": self.stopped_by_time,
        }


# ---------------------------------------------------------------------------------------------
# the load generator
# ---------------------------------------------------------------------------------------------


def check_loopback(base_url: str) -> None:
    """Refuse any target that is not a loopback address: these tools never leave the host."""
    host = urlsplit(base_url).hostname or ""
    if host in LOOPBACK_NAMES:
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"load generation is limited to loopback addresses, got {base_url!r}")


def make_client(base_url: str, concurrency: int, timeout_s: float = 120.0) -> httpx.AsyncClient:
    """An httpx client with one keep-alive connection per concurrent worker."""
    check_loopback(base_url)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout_s)


async def run_load(
    client: httpx.AsyncClient,
    schedule: Callable[[int], Upload],
    *,
    n: int,
    concurrency: int,
    max_seconds: float | None = None,
    trace_body_sent: bool = False,
    on_progress: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> LoadResult:
    """Send up to ``n`` requests, ``schedule(i)`` being the i-th, ``concurrency`` at a time.

    No new request starts after ``max_seconds`` or once ``stop`` is set; the ones in
    flight are awaited and counted. ``wall_s`` runs from the first request to the last
    answer. With
    ``trace_body_sent`` each record notes when its request body was fully written (httpx
    trace extension), which tells which requests had reached the server at a given time.
    """
    if n < 0 or concurrency < 1:
        raise ValueError(f"need n >= 0 and concurrency >= 1, got n={n}, c={concurrency}")
    check_loopback(str(client.base_url))
    started = time.perf_counter()
    result = LoadResult(concurrency=concurrency, wall_s=0.0, started=started)
    next_index = 0
    deadline = None if max_seconds is None else started + max_seconds

    async def one(i: int) -> Record:
        upload = schedule(i)
        sent: list[float] = []
        extensions = {}
        if trace_body_sent:

            async def trace(event: str, info: Mapping[str, Any]) -> None:
                if event == "http11.send_request_body.complete":
                    sent.append(time.perf_counter() - started)

            extensions["trace"] = trace
        t0 = time.perf_counter()
        status: int | None = None
        error: str | None = None
        try:
            response = await client.post(
                upload.path,
                content=upload.body,
                headers={"content-type": upload.content_type},
                extensions=extensions,
            )
            await response.aread()
            status = response.status_code
        except httpx.HTTPError as exc:
            error = type(exc).__name__
        return Record(
            kind=upload.kind,
            images=upload.images,
            started=t0 - started,
            latency=time.perf_counter() - t0,
            status=status,
            error=error,
            body_sent_at=sent[0] if sent else None,
        )

    async def worker() -> None:
        nonlocal next_index
        while next_index < n:
            if deadline is not None and time.perf_counter() >= deadline:
                result.stopped_by_time = True
                return
            if stop is not None and stop.is_set():
                return
            i = next_index
            next_index += 1
            result.records.append(await one(i))
            if on_progress is not None:
                on_progress(len(result.records))

    await asyncio.gather(*(worker() for _ in range(min(concurrency, max(n, 1)))))
    result.wall_s = time.perf_counter() - started
    return result


def measure(
    base_url: str,
    schedule: Callable[[int], Upload],
    *,
    n: int,
    concurrency: int,
    max_seconds: float | None = None,
    warmup: int = 0,
) -> LoadResult:
    """One run from a fresh client: ``warmup`` requests (not recorded), then the run."""

    async def go() -> LoadResult:
        async with make_client(base_url, concurrency) as client:
            if warmup:
                await run_load(client, schedule, n=warmup, concurrency=concurrency)
            return await run_load(
                client, schedule, n=n, concurrency=concurrency, max_seconds=max_seconds
            )

    return asyncio.run(go())


# ---------------------------------------------------------------------------------------------
# a real server process
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB (``VmRSS`` of ``/proc/<pid>/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime


class ServerProcess:
    """A server command on 127.0.0.1:``port``, its output in ``log_path``.

    ``command`` is a list with ``{port}`` placeholders; ``env`` adds to this process's
    environment. Use as a context manager: started and ready on entry, stopped (SIGTERM,
    then SIGKILL after ``stop_timeout_s``) on exit.
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        log_path: Path,
        ready_path: str = "/readyz",
        ready_timeout_s: float = 300.0,
        stop_timeout_s: float = 60.0,
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.command = [part.format(port=self.port) for part in command]
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.log_path = log_path
        self.ready_path = ready_path
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.returncode: int | None = None
        self.stop_seconds: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    def start(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            self.command, env=self.env, cwd=self.cwd, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.process.returncode} before it was ready; "
                    f"log: {self.log_path}\n{self.log_tail()}"
                )
            try:
                response = httpx.get(self.base_url + self.ready_path, timeout=2.0)
                if response.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server not ready after {self.ready_timeout_s} s; log: {self.log_path}")

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def terminate(self) -> float:
        """Send SIGTERM; returns the monotonic time it was sent."""
        assert self.process is not None
        sent = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        return sent

    def wait(self, since: float) -> int:
        """Wait for the exit after a SIGTERM sent at ``since``; SIGKILL after the timeout."""
        assert self.process is not None
        try:
            self.returncode = self.process.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.returncode = self.process.wait()
        self.stop_seconds = time.monotonic() - since
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.returncode

    def stop(self) -> int | None:
        """SIGTERM and wait (idempotent); returns the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            return self.wait(self.terminate())
        if self.returncode is None:
            self.returncode = self.process.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.returncode

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def scrape_metrics(base_url: str) -> dict[str, float]:
    """The Prometheus text exposition of ``base_url/metrics`` as ``{series: value}``,
    a series being the metric name with its label set as printed (comments skipped)."""
    check_loopback(base_url)
    text = httpx.get(base_url + "/metrics", timeout=10.0).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        try:
            values[series] = float(value)
        except ValueError:
            continue
    return values


# ---------------------------------------------------------------------------------------------
# shared by the benchmark scripts: test images, environment, docs
# ---------------------------------------------------------------------------------------------


def checkpoint_summary(checkpoint: Path) -> dict[str, Any]:
    """Name, weights hash, image shape and calibration k of a checkpoint (JSON files only)."""
    import json

    config = json.loads((checkpoint / "config.json").read_text())
    calibration = json.loads((checkpoint / "calibration.json").read_text())
    return {
        "path": str(checkpoint),
        "name": config.get("name"),
        "weights_sha256": config.get("weights_sha256"),
        "image_shape": config.get("image_shape"),
        "calibration_iwae_k": calibration.get("iwae_k"),
        "calibration_seed": calibration.get("seed", 0),
    }


def png_images(data: str, channels: int, size: int, n: int) -> list[bytes]:
    """``n`` images of the data spec (see ``training.data``) as PNG files of the model's
    geometry, so that the service spends no time resizing."""
    import io

    import numpy as np
    from PIL import Image

    from training.data import ImageShape, load_dataset

    images = load_dataset(data, ImageShape(channels, size))[:n]  # uint8 (N, C, H, W)
    out = []
    for img in images:
        pixels = img[0] if img.shape[0] == 1 else np.transpose(img, (1, 2, 0))
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def environment() -> dict[str, Any]:
    """Where and when a benchmark ran: CPU count, load, niceness, versions, commit."""
    import datetime
    import platform

    import torch

    def version(module: str) -> str | None:
        try:
            return __import__(module).__version__
        except Exception:  # noqa: BLE001 - only for the record
            return None

    # GIT_COMMIT first: a copy of the tree (the device machine's) can carry a stale .git
    commit = os.environ.get("GIT_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = None
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "niceness": os.nice(0),
        "python": platform.python_version(),
        "torch": version("torch"),
        "fastapi": version("fastapi"),
        "uvicorn": version("uvicorn"),
        "httpx": version("httpx"),
        "uvloop": version("uvloop"),  # uvicorn's event loop when installed, else asyncio's
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git_commit": commit,
    }


def results_markers(label: str = "") -> tuple[str, str]:
    """The comment lines around a results block (one block per label in a document)."""
    tag = f"results:{label}" if label else "results"
    return (
        f"<!-- {tag}:start (written by the benchmark script; edit around it) -->",
        f"<!-- {tag}:end -->",
    )


def write_results_block(path: Path, block: str, title: str, label: str = "") -> None:
    """Put ``block`` between the results markers of ``path`` (for ``label``), keeping the
    text around them; a missing block is appended, a new file gets ``title`` first."""
    start, end = results_markers(label)
    text = path.read_text() if path.exists() else f"# {title}\n"
    if start not in text or end not in text:
        text = text.rstrip("\n") + f"\n\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{block.strip()}\n{end}{tail}")


def busy_cpu_seconds() -> float:
    """CPU seconds spent busy by the whole machine so far, all cores (``/proc/stat``)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class CpuWatch:
    """CPU use over an interval: the whole machine, this process, and optionally a server
    process; what is left is other work on the machine (it competes with the benchmark)."""

    def __init__(self, server_pid: int | None = None) -> None:
        self.server_pid = server_pid
        self.t0 = time.perf_counter()
        self.machine0 = busy_cpu_seconds()
        self.self0 = sum(os.times()[:2])
        self.server0 = cpu_seconds(server_pid) if server_pid else 0.0

    def read(self) -> dict[str, float]:
        """Cores used on average since construction: machine, self, server, other."""
        wall = max(time.perf_counter() - self.t0, 1e-9)
        machine = (busy_cpu_seconds() - self.machine0) / wall
        own = (sum(os.times()[:2]) - self.self0) / wall
        server = (cpu_seconds(self.server_pid) - self.server0) / wall if self.server_pid else 0.0
        return {
            "machine_cores_busy": machine,
            "load_generator_cores": own,
            "server_cores": server,
            "other_cores": max(machine - own - server, 0.0),
        }
