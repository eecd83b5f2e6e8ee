"""Tests for model.calibration: thresholds, conformal p-values, bootstrap and serialisation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from model.calibration import (
    ScoreCalibration,
    bootstrap_fpr_interval,
    calibrate_score,
    conformal_p_values,
    threshold_for_fpr,
)


def _normal_sf(x: float) -> float:
    """P(Z > x) for a standard normal Z."""
    return 0.5 * math.erfc(x / math.sqrt(2.0))


def _ks_uniform(p: np.ndarray) -> float:
    """Kolmogorov-Smirnov distance between the empirical cdf of ``p`` and U(0, 1)."""
    x = np.sort(p)
    m = x.size
    upper = np.arange(1, m + 1) / m - x
    lower = x - np.arange(0, m) / m
    return float(max(upper.max(), lower.max()))


# ---------------------------------------------------------------------------------------------
# threshold_for_fpr
# ---------------------------------------------------------------------------------------------


def test_threshold_by_hand() -> None:
    cal = np.arange(1.0, 101.0)  # 1..100
    # quantile 0.95 "higher": index ceil(0.95 * 99) = 95 -> value 96; flagged 97..100 = 4%
    t = threshold_for_fpr(cal[::-1], target_fpr=0.05)
    assert t == 96.0
    assert np.mean(cal > t) <= 0.05
    # target_fpr == 1/n is the smallest allowed and gives the maximum
    assert threshold_for_fpr(cal, target_fpr=0.01) == 100.0
    assert threshold_for_fpr(cal, target_fpr=0.5) == np.quantile(cal, 0.5, method="higher")


@pytest.mark.parametrize(("seed", "alpha"), [(0, 0.05), (1, 0.05), (2, 0.01), (3, 0.2)])
def test_threshold_fpr_on_fresh_samples(seed: int, alpha: float) -> None:
    rng = np.random.default_rng(seed)
    n_cal, n_fresh = 2000, 20000
    t = threshold_for_fpr(rng.normal(size=n_cal), target_fpr=alpha)
    # True FPR of the threshold under N(0, 1), and the FPR measured on fresh samples.
    true_fpr = _normal_sf(t)
    fresh_fpr = float(np.mean(rng.normal(size=n_fresh) > t))
    sd_cal = math.sqrt(alpha * (1 - alpha) / n_cal)
    sd_fresh = math.sqrt(alpha * (1 - alpha) / n_fresh)
    assert abs(true_fpr - alpha) <= 3 * sd_cal + 1 / (n_cal + 1)
    assert abs(fresh_fpr - alpha) <= 3 * (sd_cal + sd_fresh) + 1 / (n_cal + 1)


def test_threshold_fpr_conservative_on_average() -> None:
    # Over many calibration sets, the mean true FPR is close to (and not above) alpha.
    rng = np.random.default_rng(7)
    alpha, n_cal = 0.1, 199
    fprs = [
        _normal_sf(threshold_for_fpr(rng.normal(size=n_cal), target_fpr=alpha)) for _ in range(300)
    ]
    assert np.mean(fprs) <= alpha + 3 * np.std(fprs) / math.sqrt(len(fprs))
    assert np.mean(fprs) >= alpha - 1 / (n_cal + 1) - 3 * np.std(fprs) / math.sqrt(len(fprs))


@pytest.mark.parametrize("bad", [0.0001, 0.0, -0.1, 0.51, 1.0, float("nan"), float("inf")])
def test_threshold_rejects_bad_target_fpr(bad: float) -> None:
    with pytest.raises(ValueError, match=r"target_fpr must be in \[1/n, 0.5\]") as info:
        threshold_for_fpr(np.arange(100.0), target_fpr=bad)
    assert str(bad) in str(info.value)
    assert "n=100" in str(info.value)


def test_threshold_message_example() -> None:
    with pytest.raises(ValueError) as info:
        threshold_for_fpr(np.zeros(100), target_fpr=0.0001)
    assert str(info.value) == "target_fpr must be in [1/n, 0.5], got 0.0001 with n=100"


def test_threshold_rejects_bad_scores() -> None:
    with pytest.raises(ValueError, match="cal_scores must contain at least 1 score"):
        threshold_for_fpr([], target_fpr=0.1)
    with pytest.raises(ValueError, match="cal_scores must be finite"):
        threshold_for_fpr([0.0, np.nan] * 10, target_fpr=0.1)
    with pytest.raises(ValueError, match="target_fpr must be a real number"):
        threshold_for_fpr(np.arange(10.0), target_fpr="0.1")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# conformal p-values
# ---------------------------------------------------------------------------------------------


def test_p_values_by_hand() -> None:
    p = conformal_p_values([1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 2.5, 4.0, 5.0, np.inf, -np.inf])
    # #{cal >= s} = 4, 4, 2, 1, 0, 0, 4; p = (1 + count) / 5
    np.testing.assert_allclose(p, [1.0, 1.0, 0.6, 0.4, 0.2, 0.2, 1.0])
    # ties in the calibration set count as "at least as extreme"
    np.testing.assert_allclose(conformal_p_values([1.0, 2.0, 2.0], [2.0]), [0.75])
    assert conformal_p_values([1.0, 2.0], np.zeros((2, 3))).shape == (2, 3)


def test_p_values_uniform_on_fresh_in_distribution() -> None:
    rng = np.random.default_rng(0)
    cal = np.sort(rng.normal(size=1000))
    p = conformal_p_values(cal, rng.normal(size=2000))
    assert np.all((p > 0) & (p <= 1))
    # Loose KS bound: 1.63 / sqrt(2000) ~ 0.036 at the 1% level, plus slack for the
    # calibration set's own sampling error and the 1/(n+1) grid.
    assert _ks_uniform(p) < 0.08
    # Validity: P(p <= u) is about u.
    for u in (0.01, 0.05, 0.1, 0.5):
        assert np.mean(p <= u) <= u + 0.03


def test_p_values_small_for_ood() -> None:
    rng = np.random.default_rng(1)
    cal = np.sort(rng.normal(size=500))
    p_ood = conformal_p_values(cal, rng.normal(4.0, 1.0, size=200))
    assert np.median(p_ood) < 0.01


def test_p_values_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="sorted_cal_scores must be sorted.*3.0 before 1.0"):
        conformal_p_values([0.0, 3.0, 1.0], [1.0])
    with pytest.raises(ValueError, match="sorted_cal_scores must contain at least 1 score"):
        conformal_p_values([], [1.0])
    with pytest.raises(ValueError, match="scores must not contain NaN"):
        conformal_p_values([0.0, 1.0], [0.5, np.nan])


# ---------------------------------------------------------------------------------------------
# bootstrap
# ---------------------------------------------------------------------------------------------


def test_bootstrap_interval() -> None:
    rng = np.random.default_rng(3)
    scores = rng.normal(size=4000)
    fpr, low, high = bootstrap_fpr_interval(scores, 1.6449, n_boot=2000, seed=0)
    assert fpr == np.mean(scores > 1.6449)
    assert low <= fpr <= high
    # Width close to the normal approximation 2 * 1.96 * sd.
    sd = math.sqrt(fpr * (1 - fpr) / scores.size)
    assert high - low == pytest.approx(2 * 1.96 * sd, rel=0.25)
    # Deterministic for a given seed.
    assert bootstrap_fpr_interval(scores, 1.6449, n_boot=2000, seed=0) == (fpr, low, high)
    # Degenerate cases collapse to a point.
    assert bootstrap_fpr_interval(scores, np.inf) == (0.0, 0.0, 0.0)
    assert bootstrap_fpr_interval([1.0, 2.0], 0.0) == (1.0, 1.0, 1.0)


def test_bootstrap_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="n_boot must be an integer >= 1, got 0"):
        bootstrap_fpr_interval([1.0], 0.0, n_boot=0)
    with pytest.raises(ValueError, match=r"level must be in \(0, 1\), got 1.0"):
        bootstrap_fpr_interval([1.0], 0.0, level=1.0)
    with pytest.raises(ValueError, match="threshold must be a number"):
        bootstrap_fpr_interval([1.0], float("nan"))
    with pytest.raises(ValueError, match="scores must contain at least 1 score"):
        bootstrap_fpr_interval([], 0.0)


# ---------------------------------------------------------------------------------------------
# ScoreCalibration / calibrate_score
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def calibration() -> ScoreCalibration:
    rng = np.random.default_rng(11)
    return calibrate_score(
        "energy", rng.normal(size=500), rng.normal(size=1000), target_fpr=0.05, n_boot=500
    )


def test_calibrate_score(calibration: ScoreCalibration) -> None:
    c = calibration
    rng = np.random.default_rng(11)
    cal = rng.normal(size=500)
    assert c.name == "energy"
    assert c.n == 500
    assert c.target_fpr == 0.05
    assert c.threshold == threshold_for_fpr(cal, target_fpr=0.05)
    assert list(c.sorted_scores) == sorted(cal.tolist())
    assert 0.0 <= c.fpr_ci_low <= c.achieved_fpr <= c.fpr_ci_high <= 1.0
    assert abs(c.achieved_fpr - 0.05) < 0.03
    scores = np.array([-10.0, 0.0, c.threshold, c.threshold + 1e-9, 10.0])
    np.testing.assert_array_equal(c.is_ood(scores), [False, False, False, True, True])
    np.testing.assert_array_equal(c.p_values(scores), conformal_p_values(c.sorted_scores, scores))
    with pytest.raises(ValueError, match="scores must not contain NaN"):
        c.is_ood([np.nan])


def test_calibrate_score_rejects_small_target(calibration: ScoreCalibration) -> None:
    with pytest.raises(ValueError, match=r"got 0.001 with n=500"):
        calibrate_score("x", np.zeros(500), np.zeros(10), target_fpr=0.001)
    with pytest.raises(ValueError, match="holdout_scores must contain at least 1 score"):
        calibrate_score("x", np.zeros(500), [], target_fpr=0.01)


def test_round_trip(calibration: ScoreCalibration) -> None:
    d = calibration.to_dict()
    restored = ScoreCalibration.from_dict(json.loads(json.dumps(d)))
    assert restored == calibration
    assert restored.to_dict() == d
    assert isinstance(d["sorted_scores"], list)
    np.testing.assert_array_equal(restored.p_values([0.0, 3.0]), calibration.p_values([0.0, 3.0]))


def _valid_dict() -> dict:
    return {
        "name": "energy",
        "threshold": 2.0,
        "target_fpr": 0.25,
        "n": 4,
        "sorted_scores": [0.0, 1.0, 2.0, 3.0],
        "achieved_fpr": 0.2,
        "fpr_ci_low": 0.1,
        "fpr_ci_high": 0.3,
    }


@pytest.mark.parametrize(
    ("field", "value", "pattern"),
    [
        ("name", "", "name must be a non-empty string"),
        ("name", 3, "name must be a non-empty string"),
        ("threshold", "2.0", "threshold must be a finite number"),
        ("threshold", float("nan"), "threshold must be a finite number"),
        ("target_fpr", 0.1, r"target_fpr must be in \[1/n, 0.5\], got 0.1 with n=4"),
        ("target_fpr", None, "target_fpr must be a number"),
        ("n", 5, "n must equal len"),
        ("n", True, "n must be an integer"),
        ("n", 4.0, "n must be an integer"),
        ("sorted_scores", [0.0, 2.0, 1.0, 3.0], "sorted_scores must be in non-decreasing order"),
        ("sorted_scores", [0.0, 1.0, "2", 3.0], r"sorted_scores\[2\] must be a finite number"),
        ("sorted_scores", [0.0, 1.0, None, 3.0], r"sorted_scores\[2\] must be a finite number"),
        ("sorted_scores", "0123", "sorted_scores must be a list or tuple"),
        ("achieved_fpr", 1.5, "achieved_fpr must be a number in"),
        ("fpr_ci_low", "0.1", "fpr_ci_low must be a number in"),
        ("fpr_ci_high", 0.05, "fpr_ci_low must be <= fpr_ci_high"),
    ],
)
def test_from_dict_rejects_malformed(field: str, value: object, pattern: str) -> None:
    d = _valid_dict()
    d[field] = value
    with pytest.raises(ValueError, match=pattern):
        ScoreCalibration.from_dict(d)


def test_from_dict_missing_unknown_and_not_mapping() -> None:
    assert ScoreCalibration.from_dict(_valid_dict()).n == 4
    d = _valid_dict()
    del d["threshold"]
    with pytest.raises(ValueError, match="missing field.*threshold"):
        ScoreCalibration.from_dict(d)
    d = _valid_dict()
    d["extra"] = 1
    with pytest.raises(ValueError, match="unknown field.*extra"):
        ScoreCalibration.from_dict(d)
    with pytest.raises(ValueError, match="must be a mapping"):
        ScoreCalibration.from_dict([("name", "x")])  # type: ignore[arg-type]


def test_frozen(calibration: ScoreCalibration) -> None:
    with pytest.raises(AttributeError):
        calibration.threshold = 0.0  # type: ignore[misc]
