"""HTTP checks of the deployment smoke test (tests/deploy/smoke_test.sh).

Standard library only: it runs on the host, outside the project's virtual environment.

    smoke_client.py ready   BASE_URL            exit 0 when GET /readyz answers 200
    smoke_client.py score   BASE_URL PNG_FILE   POST the image to /score, check the JSON
    smoke_client.py metrics BASE_URL            GET /metrics, check the exposition

Each check prints what it saw and exits 1 with the reason when the answer is wrong.
Proxies from the environment are ignored: every request goes to this machine.
"""

from __future__ import annotations

import json
import math
import sys
import urllib.error
import urllib.request
import uuid

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
TIMEOUT_S = 60


class CheckFailed(Exception):
    pass


def fetch(request: urllib.request.Request | str) -> tuple[int, str, bytes]:
    """(status, content type, body); HTTP error statuses are returned, not raised."""
    try:
        with OPENER.open(request, timeout=TIMEOUT_S) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type", ""), err.read()


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def ready(base: str) -> None:
    try:
        status, _, body = fetch(f"{base}/readyz")
    except OSError as exc:  # not listening yet
        raise CheckFailed(f"/readyz: {exc}") from exc
    check(status == 200, f"/readyz answered {status}: {body[:300]!r}")
    print(f"/readyz 200: {body.decode(errors='replace')}")


def multipart(field: str, filename: str, data: bytes, content_type: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b"".join(
        [
            f"--{boundary}\r\n".encode(),
            f'Content-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'.encode(),
            f"Content-Type: {content_type}\r\n\r\n".encode(),
            data,
            f"\r\n--{boundary}--\r\n".encode(),
        ]
    )
    return body, f"multipart/form-data; boundary={boundary}"


def score(base: str, png_path: str) -> None:
    with open(png_path, "rb") as f:
        png = f.read()
    check(png.startswith(b"\x89PNG\r\n\x1a\n"), f"{png_path} is not a PNG file")
    body, content_type = multipart("file", "smoke.png", png, "image/png")
    request = urllib.request.Request(
        f"{base}/score", data=body, method="POST", headers={"Content-Type": content_type}
    )
    status, got_type, raw = fetch(request)
    check(status == 200, f"/score answered {status} ({got_type}): {raw[:500]!r}")
    check(got_type.startswith("application/json"), f"/score content type {got_type!r}")
    answer = json.loads(raw)
    print(f"/score 200: {json.dumps(answer, indent=1)}")

    scores = answer.get("scores")
    check(isinstance(scores, dict) and scores, f"no scores in {answer}")
    for name, value in scores.items():
        check(isinstance(value, (int, float)), f"score {name} is not a number: {value!r}")
        check(math.isfinite(value), f"score {name} is not finite: {value!r}")
    decision = answer.get("decision")
    check(isinstance(decision, dict), f"no decision in {answer}")
    check(isinstance(decision.get("is_ood"), bool), f"decision.is_ood is not a bool: {decision}")
    check(decision.get("score") in scores, f"decision score {decision.get('score')!r} not scored")
    model = answer.get("model")
    check(
        isinstance(model, dict) and model.get("name") and model.get("weights_sha256"),
        f"no model name and weights hash in {answer}",
    )


def metric_samples(text: str) -> dict[str, float]:
    """``name{labels}`` -> value for every sample line of a text exposition."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def metrics(base: str) -> None:
    status, content_type, raw = fetch(f"{base}/metrics")
    check(status == 200, f"/metrics answered {status}: {raw[:300]!r}")
    check(content_type.startswith("text/plain"), f"/metrics content type {content_type!r}")
    text = raw.decode()
    samples = metric_samples(text)
    check("# TYPE" in text and samples, "/metrics has no Prometheus samples")
    check(samples.get("vaebm_ready") == 1.0, f"vaebm_ready is {samples.get('vaebm_ready')}")
    scored = samples.get("vaebm_images_scored_total", 0.0)
    check(scored >= 1, f"vaebm_images_scored_total is {scored} after a /score")
    score_requests = sum(
        v
        for k, v in samples.items()
        if k.startswith("vaebm_http_requests_total{") and 'route="/score"' in k
    )
    check(score_requests >= 1, "no /score request counted in vaebm_http_requests_total")
    print(
        f"/metrics 200: {len(samples)} samples; vaebm_ready 1, "
        f"{scored:g} image(s) scored, {score_requests:g} /score request(s)"
    )


def main(argv: list[str]) -> int:
    commands = {"ready": (ready, 1), "score": (score, 2), "metrics": (metrics, 1)}
    if not argv or argv[0] not in commands or len(argv) - 1 != commands[argv[0]][1]:
        print(__doc__, file=sys.stderr)
        return 2
    func, _ = commands[argv[0]]
    try:
        func(*[a.rstrip("/") if i == 0 else a for i, a in enumerate(argv[1:])])
    except (CheckFailed, OSError, ValueError) as exc:
        print(f"{argv[0]}: FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
