"""Query parameters a route does not take, or takes once, are refused with a 422."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from model.scores import DEFAULT_SCORE
from service.app import create_app
from tests.test_service_api import digit_png, settings_for

KEY = "query-test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def client(tiny_checkpoint: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(tiny_checkpoint, api_keys=[KEY]))) as client:
        client.headers["X-API-Key"] = KEY
        yield client


def upload() -> dict:
    return {"files": {"file": ("digit.png", digit_png(0), "image/png")}}


def assert_problem(response, slug: str, *words: str) -> None:
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["type"] == f"urn:vaebm-ood:problem:{slug}"
    for word in words:
        assert word in body["detail"]


def test_a_misspelt_parameter_is_refused_not_ignored(client):
    """`?scores=` (for `?score=`) decided on the default score without a word."""
    response = client.post("/score?scores=elbo_bpd", **upload())
    assert_problem(response, "unknown-query-parameter", "'scores'", "takes score")
    assert client.post(f"/score?score={DEFAULT_SCORE}", **upload()).status_code == 200


def test_a_repeated_parameter_is_refused_not_the_last_taken(client):
    response = client.post(f"/score?score=elbo_bpd&score={DEFAULT_SCORE}", **upload())
    assert_problem(response, "repeated-query-parameter", "'score'", "2 times")


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_route_without_parameters_refuses_any(client, method):
    response = client.request(method, "/model?verbose=1")
    assert response.status_code == 422
    if method == "GET":
        assert_problem(response, "unknown-query-parameter", "'verbose'", "takes none")
    assert client.request(method, "/model").status_code == 200


def test_the_key_is_checked_first_and_probes_are_left_alone(client):
    """An unknown parameter without a key is a 401 (nothing about the API is told before
    the key); health probes, which monitors may tag with a query string, still answer."""
    response = client.post("/score?scores=x", headers={"X-API-Key": ""}, **upload())
    assert response.status_code == 401
    assert client.get("/healthz?probe=lb").status_code == 200


@pytest.mark.parametrize(
    ("path", "name"),
    [("/sample?format=json", "format"), ("/evaluate?reference=digits", "reference")],
)
def test_a_body_field_given_as_a_query_parameter_is_refused(client, path, name):
    """`format` belongs in /sample's JSON body and `reference` in /evaluate's form: as query
    parameters they were ignored (a PNG instead of JSON, the default reference set)."""
    assert_problem(client.post(path), "unknown-query-parameter", f"'{name}'", "takes none")
