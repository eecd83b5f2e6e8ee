"""The joint-typicality score: its KDE against scipy's, leave-one-out, calibration, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import gaussian_kde

from model.calibration import conformal_p_values, threshold_for_fpr
from model.typicality import TypicalityReference
from tests.test_calibration import _ks_uniform

NAMES = ("a", "b", "c")


def correlated(n: int, seed: int) -> dict[str, np.ndarray]:
    """Three statistics tied together like likelihood, code length and energy."""
    rng = np.random.default_rng(seed)
    a = rng.normal(3.0, 1.0, n)
    b = a - 1.2 + rng.normal(0.0, 0.3, n)
    c = -5000.0 + 400.0 * rng.standard_normal(n) + 100.0 * a
    return {"a": a, "b": b, "c": c}


def test_density_matches_scipy_gaussian_kde() -> None:
    reference = TypicalityReference.fit(correlated(500, seed=0), NAMES)
    queries = correlated(50, seed=1)
    expected = -gaussian_kde(np.stack([correlated(500, seed=0)[n] for n in NAMES])).logpdf(
        np.stack([queries[n] for n in NAMES])
    )
    np.testing.assert_allclose(reference.negative_log_density(queries), expected, rtol=1e-9)
    scipy_cov = gaussian_kde(reference.points.T).covariance
    np.testing.assert_allclose(reference.bandwidth(), scipy_cov, rtol=1e-12)


def test_leave_one_out_removes_exactly_the_own_kernel() -> None:
    reference = TypicalityReference.fit(correlated(300, seed=2), NAMES)
    n = reference.n
    with_self = np.exp(
        -reference.negative_log_density(dict(zip(NAMES, reference.points.T, strict=True)))
    )
    own_kernel = np.exp(reference._log_norm)  # K_H(0)
    expected = -np.log((n * with_self - own_kernel) / (n - 1))
    np.testing.assert_allclose(reference.leave_one_out(), expected, rtol=1e-6)
    # Without its own kernel, every reference point looks less typical.
    assert (reference.leave_one_out() > -np.log(with_self)).all()


def test_far_out_points_score_very_high() -> None:
    reference = TypicalityReference.fit(correlated(1000, seed=3), NAMES)
    bulk = reference.negative_log_density({"a": [3.0], "b": [1.8], "c": [-4700.0]})
    both_high = reference.negative_log_density({"a": [9.0], "b": [7.8], "c": [-4100.0]})
    # Each statistic inside its own range, but b does not go with a (the tie is broken).
    tie_broken = reference.negative_log_density({"a": [2.0], "b": [3.5], "c": [-4800.0]})
    assert both_high[0] > bulk[0] + 10 and tie_broken[0] > bulk[0] + 10


def test_affine_change_of_statistics_keeps_the_ranking() -> None:
    """(a, b - a) ranks images exactly as (a, b): why elbo_complexity_webp_bpd can stand
    in for the WebP length."""
    cal, new = correlated(400, seed=4), correlated(100, seed=5)
    shifted = {
        k: {"a": d["a"], "b": d["b"] - d["a"], "c": d["c"]} for k, d in (("c", cal), ("n", new))
    }
    plain = TypicalityReference.fit(cal, NAMES).negative_log_density(new)
    affine = TypicalityReference.fit(shifted["c"], NAMES).negative_log_density(shifted["n"])
    np.testing.assert_allclose(plain, affine, rtol=1e-8)


@pytest.mark.parametrize("alpha", [0.05, 0.2])
def test_threshold_from_leave_one_out_holds_on_fresh_images(alpha: float) -> None:
    reference = TypicalityReference.fit(correlated(2000, seed=6), NAMES)
    threshold = threshold_for_fpr(reference.leave_one_out(), target_fpr=alpha)
    fresh = reference.negative_log_density(correlated(20000, seed=7))
    fpr = float((fresh > threshold).mean())
    # n = 2000: the threshold's own sampling error is about sqrt(alpha (1 - alpha) / n).
    assert abs(fpr - alpha) < 4 * np.sqrt(alpha * (1 - alpha) / 2000), fpr


def test_p_values_from_leave_one_out_scores_are_uniform_on_fresh_images() -> None:
    """Conformal p-values of new in-distribution images against the reference's own
    leave-one-out scores: in (0, 1] and close to uniform (KS distance, loose bound)."""
    reference = TypicalityReference.fit(correlated(1000, seed=11), NAMES)
    p = conformal_p_values(
        np.sort(reference.leave_one_out()),
        reference.negative_log_density(correlated(2000, seed=12)),
    )
    assert np.all((p > 0) & (p <= 1))
    assert _ks_uniform(p) < 0.08
    # Validity, P(p <= u) <= u, within 3 sigma of the fresh set's and the reference's
    # sampling error. In-sample reference scores (own kernel included) fail it at
    # u = 0.01 (0.037 of p-values <= 0.01 on these sets): the leave-one-out matters.
    for u in (0.01, 0.05, 0.1, 0.5):
        slack = 3 * np.sqrt(u * (1 - u)) * (1 / np.sqrt(2000) + 1 / np.sqrt(1000))
        assert np.mean(p <= u) <= u + slack, u


def test_round_trip_through_json_scores_the_same() -> None:
    reference = TypicalityReference.fit(correlated(200, seed=8), NAMES)
    again = TypicalityReference.from_dict(json.loads(json.dumps(reference.to_dict())))
    queries = correlated(20, seed=9)
    assert again.statistics == NAMES
    np.testing.assert_array_equal(
        again.negative_log_density(queries), reference.negative_log_density(queries)
    )


@pytest.mark.parametrize(
    "scores, pattern",
    [
        ({"a": [1.0, 2.0], "b": [1.0, 3.0], "c": [0.0, 1.0]}, "need more than 4 reference"),
        ({"a": np.arange(10.0), "b": np.ones(10), "c": np.arange(10.0) ** 2}, "linearly dep"),
        (
            {"a": np.arange(10.0), "b": 2 * np.arange(10.0), "c": np.sin(np.arange(10.0))},
            "linearly dep",
        ),
        ({"a": [np.nan] * 10, "b": np.arange(10.0), "c": np.arange(10.0)}, "finite"),
        ({"a": np.arange(10.0), "b": np.arange(9.0), "c": np.arange(10.0)}, "one value per image"),
        ({"a": np.arange(10.0), "b": np.arange(10.0)}, r"needs the scores \['c'\]"),
    ],
)
def test_fit_refuses_what_has_no_density(scores: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        TypicalityReference.fit(scores, NAMES)


def test_scoring_refuses_missing_statistics_and_gives_nan_for_non_finite_ones() -> None:
    reference = TypicalityReference.fit(correlated(50, seed=10), NAMES)
    with pytest.raises(ValueError, match=r"needs the scores \['c'\]"):
        reference.negative_log_density({"a": [1.0], "b": [1.0]})
    queries = {"a": [3.0, 3.0, np.nan], "b": [1.8, np.inf, 1.8], "c": [-4700.0] * 3}
    scores = reference.negative_log_density(queries)
    alone = reference.negative_log_density({k: v[:1] for k, v in queries.items()})
    assert scores[0] == alone[0] and np.isnan(scores[1:]).all()


@pytest.mark.parametrize(
    "raw, pattern",
    [
        ({"statistics": "abc", "points": [[1, 2, 3]] * 9}, "list of names"),
        ({"statistics": ["a", "a", "c"], "points": [[1, 2, 3]] * 9}, "distinct"),
        ({"statistics": ["a", "b", "c"], "points": [[1, 2]] * 9}, r"shape \(n, 3\)"),
    ],
)
def test_from_dict_refuses_malformed(raw: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        TypicalityReference.from_dict(raw)
