"""Threshold calibration and conformal p-values for OOD scores (pure numpy).

Conventions: scores are **higher = more out-of-distribution**; a sample is flagged OOD when
``s > threshold``. Calibration uses scores of in-distribution samples only, so the false
positive rate (FPR) is the share of in-distribution samples flagged. Conformal p-values are
high for samples that look in-distribution and low for samples that look OOD.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from model.metrics import as_score_array

__all__ = [
    "ScoreCalibration",
    "bootstrap_fpr_interval",
    "calibrate_score",
    "conformal_p_values",
    "threshold_for_fpr",
]

_MAX_TARGET_FPR = 0.5
# Relative slack so that target_fpr == 1/n passes despite rounding ((1 / 49) * 49 < 1 in
# floating point); a value truly below 1/n, such as 0.3333 for n = 3, is still refused.
_FPR_REL_TOL = 1e-9


def _check_target_fpr(target_fpr: Any, n: int) -> float:
    if isinstance(target_fpr, bool | np.bool_) or not isinstance(target_fpr, numbers.Real):
        raise ValueError(f"target_fpr must be a real number in [1/n, 0.5], got {target_fpr!r}")
    alpha = float(target_fpr)
    if not math.isfinite(alpha) or alpha * n < 1.0 - _FPR_REL_TOL or alpha > _MAX_TARGET_FPR:
        raise ValueError(f"target_fpr must be in [1/n, 0.5], got {target_fpr} with n={n}")
    return alpha


def _check_no_nan(scores: np.ndarray, name: str) -> None:
    if np.isnan(scores).any():
        first = int(np.flatnonzero(np.isnan(scores).ravel())[0])
        raise ValueError(f"{name} must not contain NaN, got NaN at flat index {first}")


def threshold_for_fpr(cal_scores: Any, *, target_fpr: float) -> float:
    """Threshold flagging at most ``target_fpr`` of the calibration scores.

    The threshold is ``np.quantile(cal_scores, 1 - target_fpr, method="higher")``: an
    observed calibration score, so the share of calibration scores with ``s > threshold`` is
    at most ``target_fpr * (n - 1) / n``. On fresh in-distribution data with continuous scores
    the expected FPR is about ``target_fpr`` (within ``1 / (n + 1)``).

    Parameters
    ----------
    cal_scores : array_like, shape (n,)
        Finite scores of held-out in-distribution samples, higher = more OOD.
    target_fpr : float
        Wanted false positive rate ``alpha``, in ``[1/n, 0.5]``.

    Returns
    -------
    float
        The threshold; flag OOD when ``s > threshold``.

    Raises
    ------
    ValueError
        If ``cal_scores`` is empty, not 1-D or not finite, or ``target_fpr`` is outside
        ``[1/n, 0.5]`` or not finite.
    """
    s = as_score_array(cal_scores, name="cal_scores")
    alpha = _check_target_fpr(target_fpr, s.size)
    q = min(max(1.0 - alpha, 0.0), 1.0)
    return float(np.quantile(s, q, method="higher"))


def conformal_p_values(sorted_cal_scores: Any, scores: Any) -> np.ndarray:
    """Conformal p-values of ``scores`` against in-distribution calibration scores.

    ``p(s) = (1 + #{s_cal >= s}) / (n + 1)``. For a fresh sample exchangeable with the
    calibration set, ``P(p <= u) <= u`` for every ``u`` in [0, 1] (the p-value is
    super-uniform, exactly uniform on the grid ``k / (n + 1)`` without ties).

    Parameters
    ----------
    sorted_cal_scores : array_like, shape (n,)
        Finite in-distribution calibration scores sorted in non-decreasing order,
        higher = more OOD.
    scores : array_like, any shape
        Scores to test; +/-inf allowed, NaN not.

    Returns
    -------
    numpy.ndarray, same shape as ``scores``, dtype float64
        p-values in ``[1 / (n + 1), 1]``; high = looks in-distribution, low = looks OOD.

    Raises
    ------
    ValueError
        If the calibration scores are empty, not 1-D, not finite or not sorted, or
        ``scores`` contains NaN.
    """
    cal = as_score_array(sorted_cal_scores, name="sorted_cal_scores")
    if cal.size > 1 and not np.all(cal[1:] >= cal[:-1]):
        first = int(np.flatnonzero(cal[1:] < cal[:-1])[0])
        raise ValueError(
            "sorted_cal_scores must be sorted in non-decreasing order, got "
            f"{cal[first]} before {cal[first + 1]} at index {first}"
        )
    s = np.asarray(scores, dtype=np.float64)
    _check_no_nan(s, "scores")
    n = cal.size
    n_at_least = n - np.searchsorted(cal, s, side="left")
    return (1.0 + n_at_least) / (n + 1.0)


def bootstrap_fpr_interval(
    scores: Any,
    threshold: float,
    *,
    n_boot: int = 1000,
    seed: int | None = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """Achieved FPR of a threshold on in-distribution scores, with a bootstrap interval.

    The FPR is the share of ``scores`` with ``s > threshold``. The interval is the
    percentile bootstrap interval of that share. Because the FPR is a mean of 0/1
    indicators, the count of a resample of size ``n`` drawn with replacement follows
    ``Binomial(n, fpr)`` exactly, so resamples are drawn from that distribution (same result
    as resampling indices, at ``O(n_boot)`` cost). When ``fpr`` is 0 or 1 the interval
    collapses to that point.

    Parameters
    ----------
    scores : array_like, shape (n,)
        Finite in-distribution scores (not the ones used to pick ``threshold``, for an
        unbiased estimate), higher = more OOD.
    threshold : float
        Flag OOD when ``s > threshold``; not NaN.
    n_boot : int
        Number of bootstrap resamples, >= 1.
    seed : int or None
        Seed of ``numpy.random.default_rng``.
    level : float
        Two-sided confidence level, in (0, 1).

    Returns
    -------
    fpr : float
        Achieved FPR in [0, 1].
    low, high : float
        Percentile interval bounds, ``0 <= low <= high <= 1``.

    Raises
    ------
    ValueError
        On empty/non-finite scores, NaN threshold, ``n_boot < 1`` or ``level`` outside (0, 1).
    """
    s = as_score_array(scores, name="scores")
    t = float(threshold)
    if math.isnan(t):
        raise ValueError(f"threshold must be a number (may be +/-inf), got {threshold}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, numbers.Integral) or n_boot < 1:
        raise ValueError(f"n_boot must be an integer >= 1, got {n_boot!r}")
    if not (isinstance(level, numbers.Real) and 0.0 < float(level) < 1.0):
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    n = s.size
    n_flagged = int(np.count_nonzero(s > t))
    fpr = n_flagged / n
    rng = np.random.default_rng(seed)
    boot = rng.binomial(n, fpr, size=int(n_boot)) / n
    tail = (1.0 - float(level)) / 2.0
    low, high = np.quantile(boot, [tail, 1.0 - tail])
    return float(fpr), float(low), float(high)


# ---------------------------------------------------------------------------------------------
# ScoreCalibration
# ---------------------------------------------------------------------------------------------

_FIELDS = (
    "name",
    "threshold",
    "target_fpr",
    "n",
    "sorted_scores",
    "achieved_fpr",
    "fpr_ci_low",
    "fpr_ci_high",
)


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool | np.bool_)


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool | np.bool_)


@dataclass(frozen=True)
class ScoreCalibration:
    """Calibration of one OOD score: threshold, conformal reference set and achieved FPR.

    Attributes
    ----------
    name : str
        Name of the score (a key of ``model.scores.SCORES``, e.g. ``"vaebm_bpd"``).
    threshold : float
        Flag OOD when ``s > threshold`` (higher score = more OOD).
    target_fpr : float
        Wanted false positive rate ``alpha``, in ``[1/n, 0.5]``.
    n : int
        Number of calibration scores.
    sorted_scores : tuple of float, length n
        In-distribution calibration scores, non-decreasing; reference set of
        :meth:`p_values`.
    achieved_fpr : float
        FPR of ``threshold`` measured on held-out in-distribution scores, in [0, 1].
    fpr_ci_low, fpr_ci_high : float
        Percentile bootstrap interval of ``achieved_fpr``, ``0 <= low <= high <= 1``.

    Raises
    ------
    ValueError
        On construction, if a field has a bad type or value; the message names the field.
    """

    name: str
    threshold: float
    target_fpr: float
    n: int
    sorted_scores: tuple[float, ...]
    achieved_fpr: float
    fpr_ci_low: float
    fpr_ci_high: float
    _cal: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if not isinstance(self.sorted_scores, list | tuple):
            raise ValueError(
                "sorted_scores must be a list or tuple of numbers, got "
                f"{type(self.sorted_scores).__name__}"
            )
        for i, v in enumerate(self.sorted_scores):
            if not _is_real(v) or not math.isfinite(v):
                raise ValueError(f"sorted_scores[{i}] must be a finite number, got {v!r}")
        if len(self.sorted_scores) != self.n:
            raise ValueError(
                f"n must equal len(sorted_scores), got n={self.n} and "
                f"len(sorted_scores)={len(self.sorted_scores)}"
            )
        cal = np.asarray(self.sorted_scores, dtype=np.float64)
        if cal.size > 1 and not np.all(cal[1:] >= cal[:-1]):
            i = int(np.flatnonzero(cal[1:] < cal[:-1])[0])
            raise ValueError(
                "sorted_scores must be in non-decreasing order, got "
                f"{cal[i]} before {cal[i + 1]} at index {i}"
            )
        if not _is_real(self.threshold) or not math.isfinite(self.threshold):
            raise ValueError(f"threshold must be a finite number, got {self.threshold!r}")
        if not _is_real(self.target_fpr):
            raise ValueError(f"target_fpr must be a number, got {self.target_fpr!r}")
        _check_target_fpr(self.target_fpr, self.n)
        for key in ("achieved_fpr", "fpr_ci_low", "fpr_ci_high"):
            v = getattr(self, key)
            if not _is_real(v) or not 0.0 <= v <= 1.0:
                raise ValueError(f"{key} must be a number in [0, 1], got {v!r}")
        if self.fpr_ci_low > self.fpr_ci_high:
            raise ValueError(
                f"fpr_ci_low must be <= fpr_ci_high, got {self.fpr_ci_low} > {self.fpr_ci_high}"
            )
        # Normalise to plain Python types so equality and to_dict() are stable.
        object.__setattr__(self, "sorted_scores", tuple(float(v) for v in cal))
        object.__setattr__(self, "n", int(self.n))
        for key in ("threshold", "target_fpr", "achieved_fpr", "fpr_ci_low", "fpr_ci_high"):
            object.__setattr__(self, key, float(getattr(self, key)))
        cal.flags.writeable = False
        object.__setattr__(self, "_cal", cal)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (str, float, int and a list of float) of all fields."""
        return {
            "name": self.name,
            "threshold": self.threshold,
            "target_fpr": self.target_fpr,
            "n": self.n,
            "sorted_scores": list(self.sorted_scores),
            "achieved_fpr": self.achieved_fpr,
            "fpr_ci_low": self.fpr_ci_low,
            "fpr_ci_high": self.fpr_ci_high,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScoreCalibration:
        """Build from the output of :meth:`to_dict` (e.g. after a JSON round trip).

        Raises
        ------
        ValueError
            If ``data`` is not a mapping, a field is missing or unknown, or a field has a bad
            type or value (not sorted, ``n != len(sorted_scores)``, ...); the message names
            the field.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"calibration data must be a mapping, got {type(data).__name__}")
        missing = [k for k in _FIELDS if k not in data]
        if missing:
            raise ValueError(f"calibration data is missing field(s): {', '.join(missing)}")
        unknown = sorted(str(k) for k in data if k not in _FIELDS)
        if unknown:
            raise ValueError(f"calibration data has unknown field(s): {', '.join(unknown)}")
        return cls(**{k: data[k] for k in _FIELDS})

    def p_values(self, scores: Any) -> np.ndarray:
        """Conformal p-values of ``scores`` (any shape); high = looks in-distribution.

        See :func:`conformal_p_values`. Returns an array of the same shape as ``scores`` with
        values in ``[1 / (n + 1), 1]``.
        """
        s = np.asarray(scores, dtype=np.float64)
        _check_no_nan(s, "scores")
        n_at_least = self.n - np.searchsorted(self._cal, s, side="left")
        return (1.0 + n_at_least) / (self.n + 1.0)

    def is_ood(self, scores: Any) -> np.ndarray:
        """Boolean array, same shape as ``scores``: ``True`` where ``s > threshold``.

        Raises
        ------
        ValueError
            If ``scores`` contains NaN.
        """
        s = np.asarray(scores, dtype=np.float64)
        _check_no_nan(s, "scores")
        return s > self.threshold


def calibrate_score(
    name: str,
    cal_scores: Any,
    holdout_scores: Any,
    *,
    target_fpr: float,
    n_boot: int = 1000,
    seed: int | None = 0,
) -> ScoreCalibration:
    """Calibrate a threshold on in-distribution scores and measure its FPR on a holdout.

    Parameters
    ----------
    name : str
        Score name stored in the result.
    cal_scores : array_like, shape (n,)
        Finite in-distribution scores used for the threshold (see :func:`threshold_for_fpr`)
        and as the conformal reference set; higher = more OOD.
    holdout_scores : array_like, shape (m,)
        Other finite in-distribution scores on which the achieved FPR and its 95% percentile
        bootstrap interval are measured (see :func:`bootstrap_fpr_interval`).
    target_fpr : float
        Wanted false positive rate, in ``[1/n, 0.5]``.
    n_boot : int
        Bootstrap resamples, >= 1.
    seed : int or None
        Bootstrap seed.

    Returns
    -------
    ScoreCalibration

    Raises
    ------
    ValueError
        On empty or non-finite scores or a ``target_fpr`` outside ``[1/n, 0.5]``.
    """
    cal = as_score_array(cal_scores, name="cal_scores")
    threshold = threshold_for_fpr(cal, target_fpr=target_fpr)
    holdout = as_score_array(holdout_scores, name="holdout_scores")
    fpr, low, high = bootstrap_fpr_interval(holdout, threshold, n_boot=n_boot, seed=seed)
    return ScoreCalibration(
        name=name,
        threshold=threshold,
        target_fpr=float(target_fpr),
        n=int(cal.size),
        sorted_scores=tuple(np.sort(cal).tolist()),
        achieved_fpr=fpr,
        fpr_ci_low=low,
        fpr_ci_high=high,
    )
