"""The load generator of the HTTP benchmarks (benchmarks/http_load.py), against an
in-memory ASGI app: request counts, the concurrency bound, the time bound, statuses, the
multipart encoding, the loopback guard, and the load test's request mix. Fast, no server.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import httpx
import pytest
from fastapi import FastAPI, File, UploadFile

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import http_load  # noqa: E402
import load_test  # noqa: E402


def counting_app(delay_s: float = 0.002) -> tuple[FastAPI, dict[str, int]]:
    """POST /score echoes the upload's name and size; tracks requests in flight."""
    app = FastAPI()
    state = {"in_flight": 0, "max_in_flight": 0, "calls": 0}

    @app.post("/score")
    async def score(file: Annotated[UploadFile, File()]) -> dict[str, object]:
        state["calls"] += 1
        state["in_flight"] += 1
        state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
        try:
            await asyncio.sleep(delay_s)
            data = await file.read()
        finally:
            state["in_flight"] -= 1
        return {"name": file.filename, "size": len(data)}

    @app.post("/score/batch")
    async def batch(files: Annotated[list[UploadFile], File()]) -> dict[str, int]:
        return {"count": len(files)}

    return app, state


def client_for(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1")


def test_run_load_sends_n_requests_at_most_c_at_a_time() -> None:
    app, state = counting_app()
    uploads = [http_load.single_upload(b"\x89PNG-fake-%d" % i, f"i{i}.png") for i in range(3)]

    async def go() -> http_load.LoadResult:
        async with client_for(app) as client:
            return await http_load.run_load(client, lambda i: uploads[i % 3], n=40, concurrency=5)

    result = asyncio.run(go())
    summary = result.summary()
    assert state["calls"] == 40 and summary["requests"] == 40 and summary["ok"] == 40
    assert 1 < state["max_in_flight"] <= 5
    assert summary["status_counts"] == {"200": 40} and summary["server_errors_5xx"] == 0
    assert summary["latency_ms"]["p50"] <= summary["latency_ms"]["p99"]
    assert not result.stopped_by_time


def test_run_load_stops_issuing_at_the_time_limit() -> None:
    app, state = counting_app(delay_s=0.02)
    upload = http_load.single_upload(b"x")

    async def go() -> http_load.LoadResult:
        async with client_for(app) as client:
            return await http_load.run_load(
                client, lambda i: upload, n=10_000, concurrency=2, max_seconds=0.1
            )

    result = asyncio.run(go())
    assert result.stopped_by_time and 0 < len(result.records) < 100
    assert state["calls"] == len(result.records)


def test_statuses_and_multipart_parts_reach_the_app() -> None:
    app, _ = counting_app()
    good = http_load.single_upload(b"12345", "five.png")
    batch = http_load.batch_upload([b"a", b"b", b"c"])
    wrong_field = http_load.Upload("/score", *http_load.multipart_body("nope", [("a", b"a", "x")]))

    async def go() -> list[httpx.Response]:
        async with client_for(app) as client:
            return [
                await client.post(u.path, content=u.body, headers={"content-type": u.content_type})
                for u in (good, batch, wrong_field)
            ]

    single, many, bad = asyncio.run(go())
    assert single.json() == {"name": "five.png", "size": 5}
    assert many.json() == {"count": 3} and batch.images == 3 and batch.kind == "batch"
    assert bad.status_code == 422


def test_loopback_only() -> None:
    for url in ("http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:80"):
        http_load.check_loopback(url)
    for url in ("http://10.0.0.1:8000", "http://example.com", "http://0.0.0.0:80"):
        with pytest.raises(ValueError, match="loopback"):
            http_load.check_loopback(url)


def test_percentile_and_results_block(tmp_path: Path) -> None:
    assert http_load.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert http_load.percentile([0.0, 10.0], 99) == pytest.approx(9.9)
    doc = tmp_path / "doc.md"
    http_load.write_results_block(doc, "first", "Title")
    doc.write_text("intro\n" + doc.read_text() + "outro\n")
    http_load.write_results_block(doc, "second", "Title")
    text = doc.read_text()
    assert "intro" in text and "outro" in text and "second" in text and "first" not in text


def test_load_test_mix_holds_the_requested_single_image_count() -> None:
    singles = [http_load.single_upload(b"s")]
    batches = [http_load.batch_upload([b"b"] * 8)]
    total = load_test.total_for(20_000, 50)
    schedule = load_test.mixed_schedule(singles, batches, 50)
    kinds = [schedule(i).kind for i in range(total)]
    assert kinds.count("score") == 20_000 and kinds.count("batch") == total // 50
    assert load_test.total_for(20_000, 50) - 1 - (total - 1) // 50 < 20_000
    assert kinds[49] == "batch" and kinds[48] == "score"
