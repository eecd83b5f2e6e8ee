"""Joint typicality: how unusual an image's statistics are *together*.

Each single score ranks images along one line, so an in-distribution image that is
extreme on that line (a T-shirt printed with a pixel checkerboard is both unlikely and
hard to compress) outranks OOD images that are only moderately extreme on it. The
statistics of in-distribution images are strongly tied to one another (a complex image
has a long code *and* a low likelihood), and many OOD images break that tie. In the
spirit of DoSE (Morningstar et al. 2021) this module fits a density to the calibration
images' statistic vectors and scores an image by the negative log of that density:
two-sided and multivariate, where thresholding each statistic is one-sided and blind
to how they co-vary.

The density is a Gaussian kernel density estimate with a full covariance bandwidth
(Scott's rule: the data covariance times n^(-2/(d+4)), as ``scipy.stats.gaussian_kde``,
against which the tests check it). It is written here rather than taken from scipy
because calibration needs each reference point's *leave-one-out* density: scored with
its own kernel, a calibration image would look more typical than a new image of the
same kind, and the threshold would flag too many new in-distribution images.

Units: nats of the negative log density of the statistic vector (its absolute value
depends on the statistics' units; only rankings and calibrated thresholds mean
anything). Higher = more out-of-distribution.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

# The fitted scores, each with the statistics (scores of model.scores) whose joint
# density it models. typicality_nats: the ELBO, the ELBO minus the WebP code length
# (together an affine map of likelihood and code length, which a full-covariance KDE
# ranks identically) and the energy. vaebm_typicality_nats: the same idea on the VAEBM
# density, (vaebm_bpd, vaebm_bpd minus the WebP code length), so the energy enters
# through the paper's score instead of as a statistic of its own.
TYPICALITY_SCORE = "typicality_nats"
TYPICALITY_SCORES: dict[str, tuple[str, ...]] = {
    TYPICALITY_SCORE: ("elbo_bpd", "elbo_complexity_webp_bpd", "energy"),
    "vaebm_typicality_nats": ("vaebm_bpd", "complexity_webp_bpd"),
}
TYPICALITY_STATISTICS = TYPICALITY_SCORES[TYPICALITY_SCORE]
_MAX_PAIRS_PER_CHUNK = 2_000_000  # query x reference distances held in memory at once


class TypicalityReference:
    """Reference statistic vectors (n, d) of in-distribution images and their KDE.

    Build with :meth:`fit`; score with :meth:`negative_log_density`; the reference
    points' own leave-one-out scores come from :meth:`leave_one_out`. Raises
    ``ValueError`` where no density can be fitted: too few points, non-finite values,
    or statistics that are constant or linearly dependent.
    """

    def __init__(self, statistics: tuple[str, ...], points: Any) -> None:
        points = np.asarray(points, dtype=np.float64)
        d = len(statistics)
        if d == 0 or len(set(statistics)) != d:
            raise ValueError(f"statistics must be distinct names, got {statistics!r}")
        if points.ndim != 2 or points.shape[1] != d:
            raise ValueError(f"points must have shape (n, {d}), got {points.shape}")
        if len(points) <= d + 1:
            raise ValueError(
                f"need more than {d + 1} reference images to fit a {d}-d density, got {len(points)}"
            )
        if not np.isfinite(points).all():
            raise ValueError("reference statistics must be finite (no NaN or inf)")
        self.statistics = tuple(statistics)
        self.points = points  # (n, d), row i = image i's statistics in that order
        bandwidth = self.bandwidth()
        std = np.sqrt(np.diag(bandwidth))
        # Judged on the correlation matrix, which is free of the statistics' units.
        if (std == 0).any() or np.linalg.eigvalsh(bandwidth / np.outer(std, std))[0] < 1e-10:
            raise ValueError(
                f"the reference statistics {list(statistics)} are linearly dependent "
                "(one is constant or a combination of the others): no density can be fitted"
            )
        cholesky = np.linalg.cholesky(bandwidth)
        self._whiten = np.linalg.inv(cholesky)  # maps the kernel's covariance to the identity
        self._whitened_points = points @ self._whiten.T
        # log of the kernel's normalising constant: (2 pi)^(-d/2) |H|^(-1/2)
        self._log_norm = float(-0.5 * d * np.log(2 * np.pi) - np.log(np.diag(cholesky)).sum())

    @classmethod
    def fit(
        cls,
        scores: Mapping[str, Any],
        statistics: tuple[str, ...] = TYPICALITY_STATISTICS,
    ) -> TypicalityReference:
        """The reference of in-distribution images from their scores (name -> (n,))."""
        return cls(tuple(statistics), _stack(scores, statistics))

    @property
    def n(self) -> int:
        return len(self.points)

    def bandwidth(self) -> np.ndarray:
        """The kernel covariance H (d, d): Scott's factor squared times the data covariance."""
        n, d = self.points.shape
        covariance = np.atleast_2d(np.cov(self.points, rowvar=False))
        return covariance * n ** (-2.0 / (d + 4))

    def negative_log_density(self, scores: Mapping[str, Any]) -> np.ndarray:
        """-log KDE density (nats) of each image's statistics; (B,), higher = more OOD.

        An image with a non-finite statistic gets NaN, like its other scores, so that
        one broken image does not fail the batch it was scored with.
        """
        queries = _stack(scores, self.statistics, finite=False)
        finite = np.isfinite(queries).all(axis=1)
        out = np.full(len(queries), np.nan)
        if finite.any():
            out[finite] = -self._log_density(queries[finite], leave_out_self=False)
        return out

    def leave_one_out(self) -> np.ndarray:
        """Each reference point's score under the KDE of the *other* n - 1 points (n,).

        These are the calibration images' scores: exchangeable with a new image's
        score, as a conformal threshold needs, up to the one missing kernel.
        """
        return -self._log_density(self.points, leave_out_self=True)

    def _log_density(self, queries: np.ndarray, *, leave_out_self: bool) -> np.ndarray:
        whitened = queries @ self._whiten.T
        ref = self._whitened_points
        ref_sq = (ref**2).sum(1)
        rows = max(1, _MAX_PAIRS_PER_CHUNK // len(ref))
        out = np.empty(len(queries))
        for start in range(0, len(queries), rows):
            q = whitened[start : start + rows]
            sq = (q**2).sum(1)[:, None] + ref_sq[None, :] - 2.0 * q @ ref.T
            log_kernel = -0.5 * np.maximum(sq, 0.0)
            if leave_out_self:
                idx = np.arange(start, start + len(q))
                log_kernel[idx - start, idx] = -np.inf
            top = log_kernel.max(axis=1, keepdims=True)
            log_sum = top[:, 0] + np.log(np.exp(log_kernel - top).sum(axis=1))
            out[start : start + len(q)] = log_sum
        count = self.n - 1 if leave_out_self else self.n
        return out - np.log(count) + self._log_norm

    def to_dict(self) -> dict[str, Any]:
        return {"statistics": list(self.statistics), "points": self.points.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TypicalityReference:
        statistics = d["statistics"]
        if not isinstance(statistics, list) or not all(isinstance(s, str) for s in statistics):
            raise ValueError(f"typicality statistics must be a list of names, got {statistics!r}")
        return cls(tuple(statistics), np.asarray(d["points"], dtype=np.float64))


def _stack(
    scores: Mapping[str, Any], statistics: tuple[str, ...], *, finite: bool = True
) -> np.ndarray:
    """(B, d) matrix of the named statistics, refusing missing or ragged ones (and
    non-finite ones where ``finite``)."""
    missing = [s for s in statistics if s not in scores]
    if missing:
        raise ValueError(f"typicality needs the scores {missing}; got {sorted(scores)}")
    columns = [np.asarray(scores[s], dtype=np.float64).reshape(-1) for s in statistics]
    if len({len(c) for c in columns}) != 1:
        raise ValueError("typicality statistics must have one value per image each")
    matrix = np.stack(columns, axis=1)
    if finite and not np.isfinite(matrix).all():
        raise ValueError("typicality statistics must be finite (no NaN or inf)")
    return matrix
