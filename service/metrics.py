"""Prometheus metrics, one registry per app (so that tests and apps never share counters).

Families (all prefixed ``vaebm_``):

- ``http_requests_total{method, route, status}`` and
  ``http_request_duration_seconds{method, route, status}``: every request, labelled by the
  route template (``/score``), never the raw path, so unknown paths cannot blow up the
  label set;
- ``inference_duration_seconds{kind}``: one model call (``score`` batch or ``sample``);
- ``batch_size``: images per scoring forward pass (micro-batching at work);
- ``images_scored_total``;
- ``ood_score_<name>``: one histogram per OOD score, buckets at quantiles of the
  calibration scores (so the buckets mean something for every score's scale);
- ``decisions_total{score, outcome}``: ``ood`` / ``in_distribution`` decisions;
- ``model_info{name, version, weights_sha256, device}`` and ``ready``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

from model.scores import SCORES

PREFIX = "vaebm"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
_FALLBACK_BUCKETS = tuple(float(v) for v in range(-8, 33, 2))
CONTENT_TYPE = CONTENT_TYPE_LATEST


def score_buckets(calibration_scores: Sequence[float] | None) -> tuple[float, ...]:
    """Histogram buckets at quantiles of the calibration scores (fallback: -8..32 step 2)."""
    if not calibration_scores:
        return _FALLBACK_BUCKETS
    edges = np.quantile(np.asarray(calibration_scores, dtype=np.float64), _QUANTILES)
    unique = sorted({float(f"{v:.6g}") for v in edges if math.isfinite(v)})
    return tuple(unique) if unique else _FALLBACK_BUCKETS


HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def method_label(method: str) -> str:
    """The request method as a metric label: the standard ones as sent, any other
    ``"other"``. The server accepts any token as a method, and a label taken from the
    client unchecked would let it grow the registry without bound."""
    return method if method in HTTP_METHODS else "other"


class ServiceMetrics:
    """All metrics of one app, in its own :class:`CollectorRegistry`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_http_requests_total",
            "HTTP requests by method, route template and status.",
            ("method", "route", "status"),
            registry=r,
        )
        self.request_latency = Histogram(
            f"{PREFIX}_http_request_duration_seconds",
            "Time from request start to the end of the response, seconds.",
            ("method", "route", "status"),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_latency = Histogram(
            f"{PREFIX}_inference_duration_seconds",
            "Time of one model call (a scoring batch or a sampling run), seconds.",
            ("kind",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size",
            "Images per scoring forward pass.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.images_scored = Counter(
            f"{PREFIX}_images_scored", "Images scored by the model.", registry=r
        )
        self.decisions = Counter(
            f"{PREFIX}_decisions_total",
            "OOD decisions by score and outcome (ood or in_distribution).",
            ("score", "outcome"),
            registry=r,
        )
        self.model_info = Info(
            f"{PREFIX}_model", "The served checkpoint and its device.", registry=r
        )
        self.ready = Gauge(
            f"{PREFIX}_ready", "1 when the model is loaded and warmed up.", registry=r
        )
        self.scores: dict[str, Histogram] = {}

    def bind_model(
        self,
        *,
        name: str,
        version: str,
        weights_sha256: str,
        device: str,
        calibration_scores: Mapping[str, Sequence[float]],
    ) -> None:
        """Record the model's identity and create one histogram per score."""
        self.model_info.info(
            {"name": name, "version": version, "weights_sha256": weights_sha256, "device": device}
        )
        for score_name, spec in SCORES.items():
            if score_name in self.scores:
                continue
            self.scores[score_name] = Histogram(
                f"{PREFIX}_ood_score_{score_name}",
                f"{score_name} of scored images ({spec.unit}; {spec.direction}).",
                buckets=score_buckets(calibration_scores.get(score_name)),
                registry=self.registry,
            )

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        labels = (method_label(method), route, str(status))
        self.requests.labels(*labels).inc()
        self.request_latency.labels(*labels).observe(seconds)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.images_scored.inc(size)
        self.inference_latency.labels("score").observe(seconds)

    def observe_scores(
        self, scores: Mapping[str, float], decision_score: str, is_ood: bool
    ) -> None:
        for name, value in scores.items():
            if name in self.scores and math.isfinite(value):
                self.scores[name].observe(value)
        outcome = "ood" if is_ood else "in_distribution"
        self.decisions.labels(decision_score, outcome).inc()

    def exposition(self) -> bytes:
        """The text exposition format of every metric."""
        return generate_latest(self.registry)
