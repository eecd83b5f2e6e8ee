"""The bad-input corpus (tests/bad_inputs.py) against the app: each case gets its answer.

Broken inputs get their specific 4xx as ``application/problem+json`` with ``type``,
``title``, ``status`` and ``detail``; valid but unusual images get a 200 whose image report
says what was converted. After the whole corpus the service is still ready, still scores,
and has answered no request with a 5xx.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.settings import Settings
from tests.bad_inputs import BadInput, Limits, corpus, plain_png

REPO = Path(__file__).resolve().parents[1]
LIMITS = Limits(max_upload_bytes=200_000, max_batch_files=4)
CASES = corpus(LIMITS)


@pytest.fixture(scope="module")
def client(tiny_checkpoint: Path) -> Iterator[TestClient]:
    settings = Settings(
        checkpoint=tiny_checkpoint,
        device="cpu",
        warmup=False,
        max_upload_bytes=LIMITS.max_upload_bytes,
        max_batch_files=LIMITS.max_batch_files,
        sample_max_n=4,
        sample_max_steps=2,
        batch_max_wait_ms=1,
    )  # max_image_pixels keeps its default (16 million): the corpus is built against it
    with TestClient(create_app(settings)) as client:
        yield client


def send(client: TestClient, case: BadInput):
    return client.request(case.method, case.path, content=case.body, headers=case.headers)


def test_corpus_covers_the_issue_list() -> None:
    names = {case.name for case in CASES}
    assert {
        "zero-bytes",
        "truncated-png",
        "truncated-jpeg",
        "text-as-png",
        "decompression-bomb",
        "sixteen-bit-png",
        "cmyk-jpeg",
        "animated-gif",
        "palette-png-transparency",
        "exif-rotated-jpeg",
        "body-over-byte-limit",
        "too-many-files",
        "wrong-field-name",
        "raw-png-body",
        "sample-malformed-json",
        "sample-n-zero",
    } <= names
    assert len(names) == len(CASES)  # names are unique: they are file names too
    bomb = next(c for c in CASES if c.name == "decompression-bomb")
    assert len(bomb.body) < 100_000  # small file, 400 million pixels


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_bad_input_gets_its_answer(client: TestClient, case: BadInput) -> None:
    response = send(client, case)
    assert response.status_code == case.expect_status, response.text
    assert response.headers["x-request-id"]
    if case.expect_status >= 400:
        assert response.headers["content-type"] == "application/problem+json"
        body = response.json()
        assert {"type", "title", "status", "detail"} <= set(body)
        assert body["status"] == case.expect_status
        assert body["type"] == case.expect_type
        assert body["title"] and isinstance(body["title"], str)
        assert body["detail"].startswith(case.expect_detail_prefix), body["detail"]
        assert body["instance"] == case.path
        assert body["request_id"] == response.headers["x-request-id"]
        return
    image = response.json()["image"]
    for key, value in case.expect_image.items():
        assert image[key] == value, (key, image)
    for step in case.expect_conversion:
        assert step in image["conversion"], image["conversion"]


def test_batch_reports_each_bad_file_and_scores_the_good_ones(client: TestClient) -> None:
    """The corpus's files in one /score/batch, bad and good ones in turn: one result or
    problem per file, in order, and the good ones scored as /score scores them."""
    image_cases = [c for c in CASES if c.path == "/score" and c.files]
    bad = [c for c in image_cases if c.expect_status >= 400]
    good = [c for c in image_cases if c.expect_status == 200]
    files = [bad[0], good[0], bad[1], good[1]]
    assert len(files) == LIMITS.max_batch_files
    uploads = []
    for case in files:
        ((name, data),) = case.files.items()
        media = "image/png" if name.endswith(".png") else "application/octet-stream"
        uploads.append(("files", (name, data, media)))
    response = client.post("/score/batch", files=uploads)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["count"], body["succeeded"], body["failed"]) == (4, 2, 2)
    results = body["results"]
    assert [r["status"] for r in results] == [c.expect_status for c in files]
    assert [r["filename"] for r in results] == [next(iter(c.files)) for c in files]
    for result, case in zip(results, files, strict=True):
        if case.expect_status >= 400:
            assert result["problem"]["type"] == case.expect_type
            assert result["problem"]["detail"].startswith(case.expect_detail_prefix)
            assert result["result"] is None
            continue
        assert result["problem"] is None
        image = result["result"]["image"]
        for key, value in case.expect_image.items():
            assert image[key] == value, (key, image)
        for step in case.expect_conversion:
            assert step in image["conversion"], image["conversion"]
        alone = send(client, case).json()["scores"]
        assert result["result"]["scores"] == pytest.approx(alone, rel=1e-5, abs=1e-5)


def test_service_is_still_ready_and_never_answered_5xx(client: TestClient) -> None:
    for case in CASES:  # the whole corpus again, in one go, then check the service
        assert send(client, case).status_code < 500, case.name
    assert client.get("/readyz").status_code == 200
    ok = client.post("/score", files={"file": ("a.png", plain_png(), "image/png")})
    assert ok.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    statuses = {
        s.labels["status"]
        for s in families["vaebm_http_requests"].samples
        if s.name == "vaebm_http_requests_total"
    }
    assert statuses and not [s for s in statuses if s.startswith("5")], statuses


def test_script_writes_the_corpus(tmp_path: Path) -> None:
    out = tmp_path / "corpus"
    command = [
        sys.executable,
        str(REPO / "tests" / "bad_inputs.py"),
        str(out),
        "--max-upload-bytes",
        str(LIMITS.max_upload_bytes),
        "--max-batch-files",
        str(LIMITS.max_batch_files),
    ]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["limits"] == {"max_upload_bytes": 200_000, "max_batch_files": 4}
    entries = {e["name"]: e for e in manifest["cases"]}
    assert list(entries) == [c.name for c in CASES]
    for case in CASES:  # the written bodies are the ones the tests above send
        assert (out / f"{case.name}.body").read_bytes() == case.body, case.name
        assert entries[case.name]["expect_status"] == case.expect_status
        assert entries[case.name]["headers"] == case.headers
    assert (out / "files" / "bomb.png").stat().st_size < 100_000
    assert not (tmp_path / "PICKLE_WAS_LOADED").exists()
