"""Tests for model.metrics: checked against scikit-learn and against hand-worked examples."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import auc, precision_recall_curve, roc_auc_score, roc_curve

from model.metrics import (
    METRIC_DESCRIPTIONS,
    aupr_in,
    aupr_out,
    auroc,
    error_rates_at_threshold,
    fpr_at_95_tpr,
    ood_accepted_at_95_in_kept,
    ood_metrics,
    roc_curve_points,
)


def _labelled(s_in: np.ndarray, s_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.concatenate([np.zeros(len(s_in), dtype=int), np.ones(len(s_out), dtype=int)])
    s = np.concatenate([np.asarray(s_in, dtype=float), np.asarray(s_out, dtype=float)])
    return y, s


def _sklearn_reference(s_in: np.ndarray, s_out: np.ndarray) -> dict[str, float]:
    y, s = _labelled(s_in, s_out)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    fpr_in, tpr_in, _ = roc_curve(1 - y, -s, drop_intermediate=False)
    p_out, r_out, _ = precision_recall_curve(y, s)
    p_in, r_in, _ = precision_recall_curve(1 - y, -s)
    return {
        "auroc": roc_auc_score(y, s),
        "aupr_in": auc(r_in, p_in),
        "aupr_out": auc(r_out, p_out),
        "fpr_at_95_tpr": fpr[np.argmax(tpr >= 0.95)],
        "ood_accepted_at_95_in_kept": fpr_in[np.argmax(tpr_in >= 0.95)],
    }


def _random_case(seed: int, n_in: int, n_out: int, tied: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if tied:  # integer scores on a small range: many ties, within and across classes
        return rng.integers(0, 6, n_in).astype(float), rng.integers(2, 9, n_out).astype(float)
    return rng.normal(0.0, 1.0, n_in), rng.normal(1.0, 1.5, n_out)


CASES = [
    (seed, n_in, n_out, tied)
    for seed in (0, 1, 2)
    for n_in, n_out in ((1, 1), (3, 7), (20, 20), (57, 113), (400, 150))
    for tied in (False, True)
]


@pytest.mark.parametrize(("seed", "n_in", "n_out", "tied"), CASES)
def test_matches_sklearn(seed: int, n_in: int, n_out: int, tied: bool) -> None:
    s_in, s_out = _random_case(seed, n_in, n_out, tied)
    ref = _sklearn_reference(s_in, s_out)
    got = ood_metrics(s_in, s_out)
    assert set(got) == set(ref)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert auroc(s_in, s_out) == got["auroc"]
    assert aupr_in(s_in, s_out) == got["aupr_in"]
    assert aupr_out(s_in, s_out) == got["aupr_out"]


@pytest.mark.parametrize(("seed", "n_in", "n_out", "tied"), CASES)
def test_roc_curve_points_match_sklearn(seed: int, n_in: int, n_out: int, tied: bool) -> None:
    s_in, s_out = _random_case(seed, n_in, n_out, tied)
    y, s = _labelled(s_in, s_out)
    ref_fpr, ref_tpr, ref_thr = roc_curve(y, s, drop_intermediate=False)
    fpr, tpr, thr = roc_curve_points(s_in, s_out)
    np.testing.assert_allclose(fpr, ref_fpr, rtol=0, atol=1e-15)
    np.testing.assert_allclose(tpr, ref_tpr, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(thr, ref_thr)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fpr95_matches_sklearn_default_curve_without_ties(seed: int) -> None:
    # OpenOOD calls roc_curve with its default drop_intermediate=True; without ties the
    # dropped points never change the result.
    s_in, s_out = _random_case(seed, 300, 200, tied=False)
    y, s = _labelled(s_in, s_out)
    fpr, tpr, _ = roc_curve(y, s)
    assert fpr_at_95_tpr(s_in, s_out) == fpr[np.argmax(tpr >= 0.95)]


def test_small_tied_cases_match_sklearn() -> None:
    # Many tiny integer-valued cases: lots of ties and 1-element classes.
    rng = np.random.default_rng(123)
    for _ in range(200):
        s_in = rng.integers(-3, 4, rng.integers(1, 13)).astype(float)
        s_out = rng.integers(-3, 4, rng.integers(1, 13)).astype(float)
        ref = _sklearn_reference(s_in, s_out)
        got = ood_metrics(s_in, s_out)
        for key, value in ref.items():
            assert got[key] == pytest.approx(value, abs=1e-12), (key, s_in, s_out)


def test_fpr95_uses_full_curve_with_collinear_ties() -> None:
    # OOD: 18 at 10, one at 5, one at 4; in: one at 5, one at 4, two at 0 (n_in = 4).
    # At threshold 5: tpr = 19/20, fpr = 1/4. sklearn's default roc_curve drops that point
    # (collinear with its neighbours) and would report fpr 2/4 at threshold 4; we keep the
    # minimal FPR with tpr >= 0.95, as drop_intermediate=False does.
    s_in = [5.0, 4.0, 0.0, 0.0]
    s_out = [10.0] * 18 + [5.0, 4.0]
    assert fpr_at_95_tpr(s_in, s_out) == 0.25
    y, s = _labelled(np.array(s_in), np.array(s_out))
    fpr, tpr, _ = roc_curve(y, s)
    assert fpr[np.argmax(tpr >= 0.95)] == 0.5


def test_perfect_reversed_and_constant() -> None:
    s_in, s_out = [0.0, 1.0, 2.0], [3.0, 4.0]
    assert auroc(s_in, s_out) == 1.0
    assert auroc(s_out, s_in) == 0.0
    assert auroc([5.0] * 4, [5.0] * 3) == 0.5
    perfect = ood_metrics(s_in, s_out)
    assert perfect["aupr_in"] == 1.0
    assert perfect["aupr_out"] == 1.0
    assert perfect["fpr_at_95_tpr"] == 0.0
    assert perfect["ood_accepted_at_95_in_kept"] == 0.0
    reversed_ = ood_metrics(s_out, s_in)
    assert reversed_["fpr_at_95_tpr"] == 1.0
    assert reversed_["ood_accepted_at_95_in_kept"] == 1.0


def test_auroc_ties_count_half_by_hand() -> None:
    # pairs (out, in): (1,0) win, (1,1) tie, (1,2) loss, (2,0) win, (2,1) win, (2,2) tie
    assert auroc([0, 1, 2], [1, 2]) == pytest.approx((3 + 0.5 * 2) / 6)


def test_aupr_by_hand() -> None:
    # scores in=[0, 2], out=[1, 3]. OOD positive, thresholds 3,2,1,0:
    # (recall, precision) = (0, 1), (.5, 1), (.5, .5), (1, 2/3), (1, .5)
    # area = .5*1 + 0 + .5*(.5 + 2/3)/2 + 0
    assert aupr_out([0, 2], [1, 3]) == pytest.approx(0.5 + 0.25 * (0.5 + 2 / 3))
    # In positive with -s: -in=[0, -2], -out=[-1, -3]; thresholds 0,-1,-2,-3:
    # (0, 1), (.5, 1), (.5, .5), (1, 2/3), (1, .5): same by symmetry
    assert aupr_in([0, 2], [1, 3]) == pytest.approx(0.5 + 0.25 * (0.5 + 2 / 3))


def test_two_fpr95_conventions_by_hand() -> None:
    s_in = np.arange(20.0)  # 0, 1, ..., 19
    s_out = np.concatenate([[0.5, 10.5], 100.0 + np.arange(18)])
    # OpenOOD (OOD positive): catch >= 19 of 20 OOD -> highest such threshold is the 19th
    # largest OOD score, 10.5; in-distribution with s >= 10.5 is 11..19 -> 9 / 20.
    assert fpr_at_95_tpr(s_in, s_out) == pytest.approx(0.45)
    # ODIN (in positive): keep >= 19 of 20 in (s <= t) -> lowest such t is the 19th smallest
    # in-distribution score, 18; OOD with s <= 18 is {0.5, 10.5} -> 2 / 20.
    assert ood_accepted_at_95_in_kept(s_in, s_out) == pytest.approx(0.1)
    ref = _sklearn_reference(s_in, s_out)
    assert ref["fpr_at_95_tpr"] == pytest.approx(0.45)
    assert ref["ood_accepted_at_95_in_kept"] == pytest.approx(0.1)


def test_odin_threshold_with_ties_by_hand() -> None:
    # 10 in-distribution scores; k = 10 (9/10 < 0.95) -> t = max in = 3, tied with 2 OOD.
    s_in = [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    s_out = [3, 3, 4, 5]
    assert ood_accepted_at_95_in_kept(s_in, s_out) == pytest.approx(0.5)
    # 40 in-distribution scores; k = 38 (38/40 = 0.95) -> t = 38th smallest = 37.
    s_in = np.arange(40.0)
    s_out = [36.5, 37.0, 37.5, 50.0]
    assert ood_accepted_at_95_in_kept(s_in, s_out) == pytest.approx(0.5)


def test_error_rates_at_threshold() -> None:
    rates = error_rates_at_threshold([0, 1, 2, 3], [2, 3, 4, 5], 2.0)
    # in flagged: s > 2 -> {3}; OOD accepted: s <= 2 -> {2}
    assert rates == {"fpr": 0.25, "fnr": 0.25, "balanced_accuracy": 0.75}
    assert error_rates_at_threshold([0], [1], np.inf)["fnr"] == 1.0
    with pytest.raises(ValueError, match="threshold"):
        error_rates_at_threshold([0], [1], float("nan"))


def test_ood_metrics_with_threshold_and_descriptions() -> None:
    got = ood_metrics([0, 1, 2, 3], [2, 3, 4, 5], threshold=2.0)
    assert got["fpr_at_threshold"] == 0.25
    assert got["fnr_at_threshold"] == 0.25
    assert set(got) == {
        "auroc",
        "aupr_in",
        "aupr_out",
        "fpr_at_95_tpr",
        "ood_accepted_at_95_in_kept",
        "fpr_at_threshold",
        "fnr_at_threshold",
    }
    assert set(got) <= set(METRIC_DESCRIPTIONS)
    assert all(isinstance(v, float) for v in got.values())


@pytest.mark.parametrize(
    "func",
    [
        auroc,
        aupr_in,
        aupr_out,
        fpr_at_95_tpr,
        ood_accepted_at_95_in_kept,
        roc_curve_points,
        ood_metrics,
    ],
)
def test_invalid_inputs(func) -> None:
    with pytest.raises(ValueError, match="scores_in must contain at least 1 score"):
        func([], [1.0])
    with pytest.raises(ValueError, match="scores_out must contain at least 1 score"):
        func([1.0], np.array([]))
    with pytest.raises(ValueError, match=r"scores_in must be finite.*index 1: nan"):
        func([1.0, np.nan], [1.0])
    with pytest.raises(ValueError, match=r"scores_out must be finite.*index 0: inf"):
        func([1.0], [np.inf])
    with pytest.raises(ValueError, match=r"scores_in must be 1-D.*\(2, 2\)"):
        func(np.zeros((2, 2)), [1.0])
    with pytest.raises(ValueError, match="scores_out must be an array of real numbers"):
        func([1.0], ["a"])
