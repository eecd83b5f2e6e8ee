"""calibration.json: per-score thresholds and p-value tables, tied to one set of weights.

It also holds the reference statistics of the fitted scores (``typicality_nats`` and
its kin in ``model.typicality.TYPICALITY_SCORES``: the calibration images' statistic
vectors), so that a fitted score is computed the same way wherever the calibration is
loaded.

A calibration only holds for the weights it was computed with, so the file records
their sha256 and loading refuses a file whose hash differs from the checkpoint's.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model.calibration import ScoreCalibration
from model.checkpoint import atomic_write_json
from model.scores import SCORES
from model.typicality import TYPICALITY_SCORE, TYPICALITY_SCORES, TypicalityReference

CALIBRATION_NAME = "calibration.json"
MAX_IWAE_K = 1024  # more samples per image than any request should ever cost
FORMAT_VERSION = 1


class CalibrationError(RuntimeError):
    """calibration.json is missing, corrupt, or belongs to other weights."""


@dataclass
class Calibration:
    weights_sha256: str
    target_fpr: float
    default_score: str
    scores: dict[str, ScoreCalibration]
    iwae_k: int = 16
    seed: int = 0
    data: dict[str, Any] = field(default_factory=dict)  # where the images came from
    # fitted score name -> its reference; only the scores these images could fit
    typicality: dict[str, TypicalityReference] = field(default_factory=dict)

    @property
    def score_names(self) -> tuple[str, ...]:
        """Every score this calibration can produce: the model's, plus the fitted ones
        it has a reference for (calibrations older than a fitted score lack it)."""
        return tuple(n for n, s in SCORES.items() if not s.fitted or n in self.typicality)

    def with_fitted_scores(self, scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``scores`` (from ``compute_scores``) plus the fitted scores of this calibration."""
        fitted = {name: ref.negative_log_density(scores) for name, ref in self.typicality.items()}
        return {**scores, **fitted}

    def decide(self, name: str, values: np.ndarray) -> dict[str, np.ndarray]:
        """Threshold decision and conformal p-values of one score for a batch."""
        cal = self.scores[name]
        return {"is_ood": cal.is_ood(values), "p_value": cal.p_values(values)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "weights_sha256": self.weights_sha256,
            "target_fpr": self.target_fpr,
            "default_score": self.default_score,
            "iwae_k": self.iwae_k,
            "seed": self.seed,
            "data": self.data,
            "scores": {name: cal.to_dict() for name, cal in self.scores.items()},
            **(
                {"typicality": {name: ref.to_dict() for name, ref in self.typicality.items()}}
                if self.typicality
                else {}
            ),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        scores = {name: ScoreCalibration.from_dict(v) for name, v in d["scores"].items()}
        unknown = sorted(set(scores) - set(SCORES))
        if unknown:
            raise ValueError(f"unknown score names {unknown}; known: {sorted(SCORES)}")
        typicality = _typicality_from_dict(d.get("typicality", {}))
        missing = [n for n in scores if SCORES[n].fitted and n not in typicality]
        if missing:
            raise ValueError(f"{missing} are calibrated but their references are missing")
        if d["default_score"] not in scores:
            raise ValueError(f"default_score {d['default_score']!r} has no calibration")
        iwae_k, seed, target_fpr = d.get("iwae_k", 16), d.get("seed", 0), d["target_fpr"]
        if not _is_int(iwae_k) or not 1 <= iwae_k <= MAX_IWAE_K:
            raise ValueError(f"iwae_k must be an integer in [1, {MAX_IWAE_K}], got {iwae_k!r}")
        if not _is_int(seed) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
        if not isinstance(target_fpr, int | float) or not 0 < target_fpr <= 0.5:
            raise ValueError(f"target_fpr must be in (0, 0.5], got {target_fpr!r}")
        if not isinstance(d["weights_sha256"], str):
            raise ValueError(f"weights_sha256 must be a string, got {d['weights_sha256']!r}")
        return cls(
            weights_sha256=d["weights_sha256"],
            target_fpr=float(target_fpr),
            default_score=str(d["default_score"]),
            scores=scores,
            iwae_k=iwae_k,
            seed=seed,
            data=dict(d.get("data", {})),
            typicality=typicality,
        )


def _typicality_from_dict(d: Any) -> dict[str, TypicalityReference]:
    """The fitted scores' references; files written when typicality_nats was the only
    fitted score hold its reference alone, not keyed by name."""
    if not isinstance(d, dict):
        raise ValueError(f"typicality must be an object, got {type(d).__name__}")
    if "statistics" in d:
        d = {TYPICALITY_SCORE: d}
    unknown = sorted(set(d) - set(TYPICALITY_SCORES))
    if unknown:
        raise ValueError(f"unknown fitted scores {unknown}; known: {sorted(TYPICALITY_SCORES)}")
    references = {name: TypicalityReference.from_dict(ref) for name, ref in d.items()}
    for name, ref in references.items():
        if ref.statistics != TYPICALITY_SCORES[name]:
            raise ValueError(
                f"{name} models {list(TYPICALITY_SCORES[name])}, but its reference holds "
                f"{list(ref.statistics)}"
            )
    return references


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def save_calibration(directory: str | os.PathLike, calibration: Calibration) -> Path:
    path = Path(directory) / CALIBRATION_NAME
    atomic_write_json(path, calibration.to_dict())
    return path


def load_calibration(directory: str | os.PathLike, *, weights_sha256: str) -> Calibration:
    """Read calibration.json and check it belongs to the weights with ``weights_sha256``."""
    path = Path(directory) / CALIBRATION_NAME
    if not path.is_file():
        raise CalibrationError(
            f"{path} is missing: run `vaebm calibrate --checkpoint {directory} "
            "--data HELD_OUT_IMAGES` first"
        )
    try:
        raw = json.loads(path.read_text())
        if raw.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version must be {FORMAT_VERSION}")
        calibration = Calibration.from_dict(raw)
    except (
        json.JSONDecodeError,
        UnicodeDecodeError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
    ) as exc:
        raise CalibrationError(f"{path} is corrupt or malformed: {exc}") from exc
    if calibration.weights_sha256 != weights_sha256:
        raise CalibrationError(
            f"{path} was computed for weights {calibration.weights_sha256[:16]}..., but the "
            f"checkpoint's weights are {weights_sha256[:16]}...: recalibrate with "
            f"`vaebm calibrate --checkpoint {directory} --data HELD_OUT_IMAGES`"
        )
    return calibration
