"""PNG figures for calibration and evaluation reports (matplotlib, headless)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from model.checkpoint import atomic_write_bytes  # noqa: E402
from model.metrics import roc_curve_points  # noqa: E402
from model.scores import SCORES  # noqa: E402

_LINE_STYLES = ("-", "--", "-.", ":")


def _colours(n: int) -> list:
    """n distinct colours: matplotlib's ten while they suffice, else n spread over a
    colour map (the cycle's eleventh colour is its first again)."""
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if n <= len(cycle):
        return cycle[:n]
    return [plt.get_cmap("turbo")(x) for x in np.linspace(0.0, 1.0, n)]


def _line_styles(n: int) -> list[dict]:
    """n distinct (colour, line style) pairs: the ten cycle colours solid, then dashed,
    and so on, so that curves eleven and up are not drawn like the first ones."""
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if n > len(cycle) * len(_LINE_STYLES):
        return [{"color": c, "linestyle": "-"} for c in _colours(n)]
    return [
        {"color": cycle[i % len(cycle)], "linestyle": _LINE_STYLES[i // len(cycle)]}
        for i in range(n)
    ]


def _save(fig: Figure, path: Path) -> None:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def score_histograms(
    path: Path, sets: dict[str, dict[str, np.ndarray]], thresholds: dict[str, float] | None = None
) -> None:
    """One panel per score, one histogram per named set; dashed line at the threshold."""
    names = list(next(iter(sets.values())))
    cols = 3
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        everything = np.concatenate([s[name] for s in sets.values()])
        lo, hi = np.percentile(everything, [0.5, 99.5])
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 50)
        for (label, scores), colour in zip(sets.items(), _colours(len(sets)), strict=True):
            ax.hist(
                np.clip(scores[name], lo, hi),
                bins=bins,
                alpha=0.5,
                density=True,
                label=label,
                color=colour,
            )
        if thresholds and name in thresholds:
            ax.axvline(thresholds[name], color="k", linestyle="--", linewidth=1)
        ax.set_title(f"{name} ({SCORES[name].unit})", fontsize=9)
        ax.legend(fontsize=7)
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    _save(fig, path)


def roc_curves(
    path: Path, scores_in: dict[str, np.ndarray], scores_out: dict[str, np.ndarray], title: str
) -> None:
    """ROC curve of every score for one OOD set (OOD = positive class)."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, style in zip(scores_in, _line_styles(len(scores_in)), strict=True):
        fpr, tpr, _ = roc_curve_points(scores_in[name], scores_out[name])
        ax.plot(fpr, tpr, label=name, **style)
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.5)
    ax.set_xlabel("false positive rate (in-distribution flagged)")
    ax.set_ylabel("true positive rate (OOD caught)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    _save(fig, path)
