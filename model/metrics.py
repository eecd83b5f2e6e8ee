"""Out-of-distribution detection metrics (pure numpy).

This is the single metrics module shared by the offline evaluator and the HTTP service.

Conventions
-----------
* Every OOD score is **higher = more out-of-distribution**.
* OOD is the **positive** class: ``y = 1`` for OOD samples (``scores_out``), ``y = 0`` for
  in-distribution samples (``scores_in``).
* A sample is *flagged* OOD at threshold ``t`` when ``s > t`` and *accepted* (kept as
  in-distribution) when ``s <= t``.

All functions take two 1-D arrays of finite scores, ``scores_in`` of shape ``(n_in,)`` and
``scores_out`` of shape ``(n_out,)``; both must be non-empty. Results agree with scikit-learn
(``roc_auc_score``, ``roc_curve``, ``precision_recall_curve`` + ``auc``) on ``(y, s)`` but no
scikit-learn call is made here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "METRIC_DESCRIPTIONS",
    "as_score_array",
    "aupr_in",
    "aupr_out",
    "auroc",
    "error_rates_at_threshold",
    "fpr_at_95_tpr",
    "ood_accepted_at_95_in_kept",
    "ood_metrics",
    "roc_curve_points",
]

#: Recall level used by the two "at 95%" metrics.
_LEVEL_95 = 0.95

METRIC_DESCRIPTIONS: dict[str, str] = {
    "auroc": (
        "Area under the ROC curve with OOD as the positive class (higher score = more OOD): "
        "the probability that a random OOD sample scores higher than a random "
        "in-distribution sample, ties counting one half. 1 = perfect, 0.5 = chance. "
        "Higher is better."
    ),
    "aupr_in": (
        "Area under the precision-recall curve with in-distribution as the positive class "
        "and the negated score (trapezoidal rule, as OpenOOD v1.5 / pytorch-ood). Baseline "
        "equals the in-distribution share of the evaluation set. Higher is better."
    ),
    "aupr_out": (
        "Area under the precision-recall curve with OOD as the positive class and the score "
        "as is (trapezoidal rule, as OpenOOD v1.5 / pytorch-ood). Baseline equals the OOD "
        "share of the evaluation set. Higher is better."
    ),
    "fpr_at_95_tpr": (
        "OpenOOD / pytorch-ood convention (OOD positive): share of in-distribution samples "
        "flagged OOD at the highest threshold that still flags at least 95% of OOD samples. "
        "Lower is better."
    ),
    "ood_accepted_at_95_in_kept": (
        "ODIN convention (in-distribution positive): share of OOD samples accepted as "
        "in-distribution (missed) at the lowest threshold that keeps at least 95% of "
        "in-distribution samples. Lower is better."
    ),
    "fpr_at_threshold": (
        "Share of in-distribution samples flagged OOD (score > threshold) at the given "
        "operating threshold. Lower is better."
    ),
    "fnr_at_threshold": (
        "Share of OOD samples accepted as in-distribution (score <= threshold) at the given "
        "operating threshold. Lower is better."
    ),
}


# ---------------------------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------------------------


def as_score_array(scores: Any, *, name: str = "scores") -> np.ndarray:
    """Validate scores and return them as a 1-D float64 array.

    Parameters
    ----------
    scores : array_like, shape (n,)
        Scores, higher = more out-of-distribution.
    name : str
        Name used in error messages.

    Returns
    -------
    numpy.ndarray, shape (n,), dtype float64
        The scores (a copy only when a conversion was needed).

    Raises
    ------
    ValueError
        If ``scores`` is not 1-D, is empty, or contains NaN or +/-inf.
    """
    try:
        arr = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be an array of real numbers: {exc}") from exc
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got an array of shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} must contain at least 1 score, got an empty array")
    finite = np.isfinite(arr)
    if not finite.all():
        bad = int(arr.size - np.count_nonzero(finite))
        first = int(np.flatnonzero(~finite)[0])
        raise ValueError(
            f"{name} must be finite, got {bad} non-finite value(s) (NaN or inf), "
            f"first at index {first}: {arr[first]}"
        )
    return arr


def _check_pair(scores_in: Any, scores_out: Any) -> tuple[np.ndarray, np.ndarray]:
    return (
        as_score_array(scores_in, name="scores_in"),
        as_score_array(scores_out, name="scores_out"),
    )


def _binary_counts(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative counts at every distinct score, thresholds in decreasing order.

    Returns ``(tps, fps, thresholds)`` with ``tps[i] = #{pos >= thresholds[i]}`` and
    ``fps[i] = #{neg >= thresholds[i]}``, each of shape ``(n_distinct,)``.
    """
    thresholds = np.unique(np.concatenate([pos, neg]))[::-1]
    pos_sorted = np.sort(pos)
    neg_sorted = np.sort(neg)
    tps = pos.size - np.searchsorted(pos_sorted, thresholds, side="left")
    fps = neg.size - np.searchsorted(neg_sorted, thresholds, side="left")
    return tps, fps, thresholds


def _aupr(pos: np.ndarray, neg: np.ndarray) -> float:
    """Trapezoidal area under the precision-recall curve, ``pos`` being the positive class."""
    tps, fps, _ = _binary_counts(pos, neg)
    precision = tps / (tps + fps)
    recall = tps / pos.size
    # The curve starts at (recall 0, precision 1), as scikit-learn's precision_recall_curve.
    recall = np.concatenate([[0.0], recall])
    precision = np.concatenate([[1.0], precision])
    return float(np.sum(np.diff(recall) * (precision[1:] + precision[:-1]) / 2.0))


def _first_fpr_at_tpr(fpr: np.ndarray, tpr: np.ndarray, level: float) -> float:
    """``fpr`` at the first curve point whose ``tpr >= level`` (curve ends at tpr = 1)."""
    return float(fpr[int(np.argmax(tpr >= level))])


# ---------------------------------------------------------------------------------------------
# public metrics
# ---------------------------------------------------------------------------------------------


def auroc(scores_in: Any, scores_out: Any) -> float:
    """Area under the ROC curve, OOD positive, computed with the Mann-Whitney U statistic.

    Parameters
    ----------
    scores_in : array_like, shape (n_in,)
        Scores of in-distribution samples (label 0), higher = more OOD.
    scores_out : array_like, shape (n_out,)
        Scores of OOD samples (label 1), higher = more OOD.

    Returns
    -------
    float
        ``P(s_out > s_in) + 0.5 * P(s_out == s_in)`` in [0, 1]; higher is better.
        Equals ``sklearn.metrics.roc_auc_score(y, s)`` with ``y = 1`` for OOD.

    Raises
    ------
    ValueError
        If either array is empty, not 1-D, or contains NaN/inf.
    """
    s_in, s_out = _check_pair(scores_in, scores_out)
    n_in, n_out = s_in.size, s_out.size
    both = np.concatenate([s_in, s_out])
    _, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    # Mid-ranks (1-based) of each distinct value: ties share the average of their ranks.
    ends = np.cumsum(counts)
    mid_ranks = ends - (counts - 1) / 2.0
    rank_sum_out = float(np.sum(mid_ranks[inverse[n_in:]]))
    u_out = rank_sum_out - n_out * (n_out + 1) / 2.0
    return u_out / (float(n_in) * float(n_out))


def roc_curve_points(scores_in: Any, scores_out: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve with OOD positive, at every distinct score.

    Same points as ``sklearn.metrics.roc_curve(y, s, drop_intermediate=False)``: the first
    point is ``(0, 0)`` at threshold ``+inf``, then one point per distinct score in
    decreasing order, where a sample counts as flagged when ``s >= threshold``.

    Parameters
    ----------
    scores_in : array_like, shape (n_in,)
        In-distribution scores (negatives), higher = more OOD.
    scores_out : array_like, shape (n_out,)
        OOD scores (positives), higher = more OOD.

    Returns
    -------
    fpr : numpy.ndarray, shape (n_distinct + 1,)
        Share of in-distribution samples with ``s >= threshold``; non-decreasing, 0 to 1.
    tpr : numpy.ndarray, shape (n_distinct + 1,)
        Share of OOD samples with ``s >= threshold``; non-decreasing, 0 to 1.
    thresholds : numpy.ndarray, shape (n_distinct + 1,)
        ``+inf`` followed by the distinct scores, strictly decreasing.

    Raises
    ------
    ValueError
        If either array is empty, not 1-D, or contains NaN/inf.
    """
    s_in, s_out = _check_pair(scores_in, scores_out)
    tps, fps, thresholds = _binary_counts(s_out, s_in)
    fpr = np.concatenate([[0.0], fps / s_in.size])
    tpr = np.concatenate([[0.0], tps / s_out.size])
    thresholds = np.concatenate([[np.inf], thresholds])
    return fpr, tpr, thresholds


def aupr_out(scores_in: Any, scores_out: Any) -> float:
    """Area under the precision-recall curve with OOD as the positive class.

    Trapezoidal area, as ``sklearn.metrics.auc(recall, precision)`` on
    ``precision_recall_curve(y, s)`` with ``y = 1`` for OOD (OpenOOD v1.5 / pytorch-ood).

    Parameters
    ----------
    scores_in : array_like, shape (n_in,)
        In-distribution scores, higher = more OOD.
    scores_out : array_like, shape (n_out,)
        OOD scores, higher = more OOD.

    Returns
    -------
    float
        Area in [0, 1]; higher is better. Chance level is ``n_out / (n_in + n_out)``.

    Raises
    ------
    ValueError
        If either array is empty, not 1-D, or contains NaN/inf.
    """
    s_in, s_out = _check_pair(scores_in, scores_out)
    return _aupr(s_out, s_in)


def aupr_in(scores_in: Any, scores_out: Any) -> float:
    """Area under the precision-recall curve with in-distribution as the positive class.

    Trapezoidal area, as ``sklearn.metrics.auc(recall, precision)`` on
    ``precision_recall_curve(1 - y, -s)`` (OpenOOD v1.5 / pytorch-ood).

    Parameters
    ----------
    scores_in : array_like, shape (n_in,)
        In-distribution scores, higher = more OOD.
    scores_out : array_like, shape (n_out,)
        OOD scores, higher = more OOD.

    Returns
    -------
    float
        Area in [0, 1]; higher is better. Chance level is ``n_in / (n_in + n_out)``.

    Raises
    ------
    ValueError
        If either array is empty, not 1-D, or contains NaN/inf.
    """
    s_in, s_out = _check_pair(scores_in, scores_out)
    return _aupr(-s_in, -s_out)


def fpr_at_95_tpr(scores_in: Any, scores_out: Any) -> float:
    """Share of in-distribution flagged OOD when 95% of OOD is caught (OpenOOD convention).

    OOD is positive. On the full ROC curve of :func:`roc_curve_points` this is
    ``fpr[argmax(tpr >= 0.95)]``: the FPR at the highest threshold ``t`` such that at least
    95% of OOD samples have ``s >= t``, i.e. the smallest FPR reachable with TPR >= 0.95.

    Parameters
    ----------
    scores_in : array_like, shape (n_in,)
        In-distribution scores, higher = more OOD.
    scores_out : array_like, shape (n_out,)
        OOD scores, higher = more OOD.

    Returns
    -------
    float
        FPR in [0, 1]; lower is better.

    Raises
    ------
    ValueError
        If either array is empty, not 1-D, or contains NaN/inf.

    Notes
    -----
    This uses every curve point (``drop_intermediate=False``). scikit-learn's default
    ``roc_curve`` drops collinear points; with tied scores that can, rarely, remove the
    first point reaching 95% and give a larger value than this one. Without ties both agree.
    """
    fpr, tpr, _ = roc_curve_points(scores_in, scores_out)
    return _first_fpr_at_tpr(fpr, tpr, _LEVEL_95)


def ood_accepted_at_95_in_kept(scores_in: Any, scores_out: Any) -> float:
    """Share of OOD accepted when 95% of in-distribution is kept (ODIN convention).

    In-distribution is positive here. Let ``a_(1) <= ... <= a_(n_in)`` be the sorted
    in-distribution scores and ``k`` the smallest integer with ``k / n_in >= 0.95``. The
    threshold is ``t = a_(k)``, the lowest threshold keeping (``s <= t``) at least 95% of
    in-distribution samples. The result is ``#{s_out <= t} / n_out``.

    Equals ``fpr[argmax(tpr >= 0.95)]`` from ``roc_curve(1 - y, -s)``.

    Parameters
    ----------
    scores_in : array_like, shape (n_in,)
        In-distribution scores, higher = more OOD.
    scores_out : array_like, shape (n_out,)
        OOD scores, higher = more OOD.

    Returns
    -------
    float
        Share of OOD samples accepted (missed), in [0, 1]; lower is better.

    Raises
    ------
    ValueError
        If either array is empty, not 1-D, or contains NaN/inf.
    """
    s_in, s_out = _check_pair(scores_in, scores_out)
    n_in = s_in.size
    kept_share = np.arange(1, n_in + 1) / n_in
    k = int(np.argmax(kept_share >= _LEVEL_95)) + 1
    threshold = np.sort(s_in)[k - 1]
    return float(np.count_nonzero(s_out <= threshold) / s_out.size)


def error_rates_at_threshold(scores_in: Any, scores_out: Any, threshold: float) -> dict[str, float]:
    """Error rates of the rule "flag OOD when ``s > threshold``".

    Parameters
    ----------
    scores_in : array_like, shape (n_in,)
        In-distribution scores, higher = more OOD.
    scores_out : array_like, shape (n_out,)
        OOD scores, higher = more OOD.
    threshold : float
        Operating threshold; may be +/-inf, not NaN.

    Returns
    -------
    dict[str, float]
        ``fpr``: share of in-distribution flagged (``s > threshold``), lower is better;
        ``fnr``: share of OOD accepted (``s <= threshold``), lower is better;
        ``balanced_accuracy``: ``1 - (fpr + fnr) / 2``, higher is better.

    Raises
    ------
    ValueError
        If either array is empty, not 1-D, or contains NaN/inf, or ``threshold`` is NaN.
    """
    s_in, s_out = _check_pair(scores_in, scores_out)
    t = float(threshold)
    if np.isnan(t):
        raise ValueError(f"threshold must be a number (may be +/-inf), got {threshold}")
    fpr = float(np.count_nonzero(s_in > t) / s_in.size)
    fnr = float(np.count_nonzero(s_out <= t) / s_out.size)
    return {"fpr": fpr, "fnr": fnr, "balanced_accuracy": 1.0 - (fpr + fnr) / 2.0}


def ood_metrics(
    scores_in: Any, scores_out: Any, *, threshold: float | None = None
) -> dict[str, float]:
    """All OOD metrics by name (see :data:`METRIC_DESCRIPTIONS`).

    Parameters
    ----------
    scores_in : array_like, shape (n_in,)
        In-distribution scores, higher = more OOD.
    scores_out : array_like, shape (n_out,)
        OOD scores, higher = more OOD.
    threshold : float, optional
        Operating threshold (flag OOD when ``s > threshold``). When given, the result also
        holds ``fpr_at_threshold`` and ``fnr_at_threshold``.

    Returns
    -------
    dict[str, float]
        Keys ``auroc``, ``aupr_in``, ``aupr_out`` (higher is better), ``fpr_at_95_tpr``,
        ``ood_accepted_at_95_in_kept`` (lower is better), plus ``fpr_at_threshold`` and
        ``fnr_at_threshold`` (lower is better) when ``threshold`` is given.

    Raises
    ------
    ValueError
        If either array is empty, not 1-D, or contains NaN/inf, or ``threshold`` is NaN.
    """
    s_in, s_out = _check_pair(scores_in, scores_out)
    result = {
        "auroc": auroc(s_in, s_out),
        "aupr_in": aupr_in(s_in, s_out),
        "aupr_out": aupr_out(s_in, s_out),
        "fpr_at_95_tpr": fpr_at_95_tpr(s_in, s_out),
        "ood_accepted_at_95_in_kept": ood_accepted_at_95_in_kept(s_in, s_out),
    }
    if threshold is not None:
        rates = error_rates_at_threshold(s_in, s_out, threshold)
        result["fpr_at_threshold"] = rates["fpr"]
        result["fnr_at_threshold"] = rates["fnr"]
    return result
