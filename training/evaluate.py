"""`vaebm evaluate`: AUROC, AUPR and FPR@95 of every score against named OOD sets.

OOD is the positive class. Writes metrics.json, report.md, one ROC figure per OOD
set and score histograms into the output directory. The metric functions are
those of ``model.metrics``, which the service's /evaluate endpoint also uses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.calibration_file import CalibrationError, load_calibration
from model.checkpoint import atomic_write_bytes, atomic_write_json, load_checkpoint
from model.device import select_device
from model.metrics import METRIC_DESCRIPTIONS, ood_metrics
from training.data import ImageShape, load_dataset
from training.plots import roc_curves, score_histograms
from training.scoring import cache_key, score_dataset

log = logging.getLogger(__name__)


@dataclass
class EvaluateArgs:
    checkpoint: str
    in_data: str  # in-distribution test images
    ood: dict[str, str] = field(default_factory=dict)  # name -> data spec
    out: str = "runs/evaluate"
    iwae_k: int = 16
    batch_size: int = 64
    seed: int = 0
    device: str = "auto"


def parse_named_specs(items: list[str]) -> dict[str, str]:
    """``["mnist=path", ...]`` -> ``{"mnist": "path"}``, refusing malformed or repeated names."""
    named: dict[str, str] = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            raise ValueError(f"--ood takes NAME=PATH, got {item!r}")
        if name in named:
            raise ValueError(f"--ood name {name!r} given twice")
        named[name] = spec
    return named


def evaluate(args: EvaluateArgs) -> dict:
    """Score the in-distribution set and each OOD set; write and return the metrics."""
    if not args.ood:
        raise ValueError("give at least one OOD set: --ood NAME=PATH")
    out = Path(args.out)
    model, info = load_checkpoint(args.checkpoint, select_device(args.device))
    shape = ImageShape(*model.vae.image_shape[:2])
    try:
        calibration = load_calibration(args.checkpoint, weights_sha256=info.weights_sha256)
        thresholds = {name: c.threshold for name, c in calibration.scores.items()}
        with_fitted = calibration.with_fitted_scores
    except CalibrationError as exc:
        log.warning(
            "no usable calibration: error rates at threshold and fitted scores "
            "(typicality_nats and its kin) are skipped: %s",
            exc,
        )
        thresholds, with_fitted = {}, dict

    def scores_of(label: str, spec: str) -> dict[str, np.ndarray]:
        key = cache_key(sha=info.weights_sha256, data=spec, k=args.iwae_k, seed=args.seed)
        scores = score_dataset(
            model,
            load_dataset(spec, shape),
            iwae_k=args.iwae_k,
            seed=args.seed,
            batch_size=args.batch_size,
            cache=out / f".scores-{label}.npz",
            key=key,
            desc=label,
        )
        return with_fitted(scores)

    scores_in = scores_of("in", args.in_data)
    results: dict[str, dict] = {}
    all_sets = {"in-distribution": scores_in}
    for name, spec in args.ood.items():
        scores_out = scores_of(f"ood-{name}", spec)
        all_sets[name] = scores_out
        results[name] = {
            score: ood_metrics(scores_in[score], scores_out[score], threshold=thresholds.get(score))
            for score in scores_in
        }
        roc_curves(out / f"roc-{name}.png", scores_in, scores_out, f"{info.name}: in vs {name}")
    score_histograms(out / "histograms.png", all_sets, thresholds)
    report = {
        "checkpoint": {"name": info.name, "weights_sha256": info.weights_sha256},
        "in_distribution": args.in_data,
        "ood_sets": args.ood,
        "sizes": {name: len(s["elbo_bpd"]) for name, s in all_sets.items()},
        "thresholds": thresholds,
        "metrics": results,
        "conventions": METRIC_DESCRIPTIONS,
    }
    atomic_write_json(out / "metrics.json", report)
    atomic_write_bytes(out / "report.md", markdown_report(report).encode())
    for label in ["in", *(f"ood-{n}" for n in args.ood)]:
        (out / f".scores-{label}.npz").unlink(missing_ok=True)
    return report


def markdown_report(report: dict) -> str:
    lines = [
        f"# OOD evaluation of `{report['checkpoint']['name']}`",
        "",
        f"In-distribution: `{report['in_distribution']}` ({report['sizes']['in-distribution']} "
        "images). OOD is the positive class; every score is higher = more OOD.",
        "",
    ]
    for name, per_score in report["metrics"].items():
        lines += [
            f"## {name} (`{report['ood_sets'][name]}`, {report['sizes'][name]} images)",
            "",
            "| score | AUROC | AUPR-IN | AUPR-OUT | FPR@95TPR | OOD accepted @95% ID kept "
            "| FPR at threshold | FNR at threshold |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for score, m in per_score.items():
            at = [
                f"{m[k]:.4f}" if k in m else "-" for k in ("fpr_at_threshold", "fnr_at_threshold")
            ]
            lines.append(
                f"| `{score}` | {m['auroc']:.4f} | {m['aupr_in']:.4f} | {m['aupr_out']:.4f} "
                f"| {m['fpr_at_95_tpr']:.4f} | {m['ood_accepted_at_95_in_kept']:.4f} "
                f"| {at[0]} | {at[1]} |"
            )
        lines += ["", f"![ROC](roc-{name}.png)", ""]
    lines += ["## Conventions", ""]
    lines += [f"- `{k}`: {v}" for k, v in report["conventions"].items()]
    lines += ["", "![histograms](histograms.png)", ""]
    return "\n".join(lines)
