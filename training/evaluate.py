"""`vaebm evaluate`: AUROC, AUPR and FPR@95 of every score against named OOD sets.

OOD is the positive class. Writes metrics.json, report.md, one ROC figure per OOD
set and score histograms into the output directory. The metric functions are
those of ``model.metrics``, which the service's /evaluate endpoint also uses.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import training.flags as flags
from model.calibration_file import CALIBRATION_NAME, CalibrationError, load_calibration
from model.checkpoint import (
    CheckpointInfo,
    atomic_write_bytes,
    atomic_write_json,
    load_checkpoint,
)
from model.device import select_device
from model.metrics import METRIC_DESCRIPTIONS, ood_metrics
from training.data import ImageShape, load_dataset
from training.flags import checked
from training.plots import roc_curves, score_histograms
from training.scoring import score_dataset, scores_key

log = logging.getLogger(__name__)
IN_DISTRIBUTION = "in-distribution"  # the in-distribution set's name in metrics.json


@dataclass
class EvaluateArgs:
    """Settings of ``vaebm evaluate``; each is a flag (in_data is --in, ood is --ood).

    Parameters
    ----------
    checkpoint : str
        Checkpoint directory to evaluate.
    in_data : str
        Data spec of the in-distribution test images.
    ood : dict[str, str]
        The OOD sets: each one's name in the report and its data spec.
    out : str
        Directory for metrics.json, report.md and the plots.
    iwae_k : int
        Importance samples of the IWAE bound behind iwae_bpd and vaebm_bpd.
    batch_size : int
        Images scored at once.
    seed : int
        Seed of the scores' sampling.
    device : str
        auto (CUDA when present, CPU otherwise), cpu, cuda or cuda:N.
    ignore_calibration : bool
        Evaluate without the checkpoint's calibration.json (no error rates at the
        thresholds, no fitted scores). Without this flag a calibration.json that is
        corrupt or of other weights is an error; a checkpoint without one is evaluated
        without it either way.
    """

    checkpoint: str
    in_data: str = flags.checked_required(flags.data_spec)
    ood: dict[str, str] = field(default_factory=dict)
    out: str = "runs/evaluate"
    iwae_k: int = checked(16, flags.iwae_k)
    batch_size: int = checked(64, flags.positive_int)
    seed: int = checked(0, flags.seed)
    device: str = checked("auto", flags.device)
    ignore_calibration: bool = False


def parse_named_specs(items: list[str]) -> dict[str, str]:
    """``["mnist=path", ...]`` -> ``{"mnist": "path"}``, refusing malformed or repeated
    names (:func:`evaluate` checks the names and specs themselves, before any work)."""
    named: dict[str, str] = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            raise flags.FlagError(f"--ood takes NAME=PATH, got {item!r}")
        if name in named:
            raise flags.FlagError(f"--ood name {name!r} given twice")
        named[name] = spec
    return named


def check_ood_name(name: str) -> None:
    """Refuse an OOD set name that could not safely name files in --out, or that is the
    in-distribution set's own name in the report (its sizes and histograms would be
    overwritten by the OOD set's)."""
    try:
        flags.report_name(name)
    except flags.FlagError as exc:
        raise flags.FlagError(f"--ood name {exc}") from None
    if name == IN_DISTRIBUTION:
        raise flags.FlagError(
            f"--ood name {name!r} is reserved for the --in set in the report; choose another"
        )


def check_ood_spec(name: str, spec: str) -> None:
    """Refuse, naming the set, an OOD data spec that cannot load (before any scoring)."""
    try:
        flags.data_spec(spec)
    except flags.FlagError as exc:
        raise flags.FlagError(f"--ood {name}: {exc}") from None


def output_names(ood: dict[str, str]) -> list[str]:
    """The files evaluate writes into --out, to check them all before any scoring."""
    return [*(f"roc-{name}.png" for name in ood), "histograms.png", "report.md", "metrics.json"]


def calibration_scores(args: EvaluateArgs, info: CheckpointInfo) -> tuple[dict, Callable]:
    """The calibration's thresholds and its fitted scores' function, or none of them.

    None without a calibration.json (thresholds are then omitted, with a warning) or
    with --ignore-calibration. A calibration.json that is corrupt or belongs to other
    weights is refused: its thresholds would silently be wrong or missing.
    """
    if args.ignore_calibration:
        log.info("--ignore-calibration: error rates at threshold and fitted scores skipped")
        return {}, dict
    if not (Path(args.checkpoint) / CALIBRATION_NAME).is_file():
        log.warning(
            "no calibration in %s: error rates at threshold and fitted scores "
            "(typicality_nats and its kin) are skipped",
            args.checkpoint,
        )
        return {}, dict
    try:
        calibration = load_calibration(args.checkpoint, weights_sha256=info.weights_sha256)
    except CalibrationError as exc:
        raise CalibrationError(
            f"{exc}. To evaluate without its thresholds, pass --ignore-calibration"
        ) from exc
    thresholds = {name: c.threshold for name, c in calibration.scores.items()}
    return thresholds, calibration.with_fitted_scores


def evaluate(args: EvaluateArgs) -> dict:
    """Score the in-distribution set and each OOD set; write and return the metrics.

    The settings, the OOD names, --out, the checkpoint, its calibration and every data
    set are checked (all loaded) before the first image is scored.
    """
    flags.validate_fields(args)
    if not args.ood:
        raise flags.FlagError("give at least one OOD set: --ood NAME=PATH")
    for name, spec in args.ood.items():
        check_ood_name(name)
        check_ood_spec(name, spec)
    out = Path(args.out)
    flags.check_writable_directory(out, "--out")
    flags.check_output_files(out, output_names(args.ood), "--out")
    model, info = load_checkpoint(args.checkpoint, select_device(args.device))
    thresholds, with_fitted = calibration_scores(args, info)
    shape = ImageShape(*model.vae.image_shape[:2])
    images = {"in": load_dataset(args.in_data, shape)}
    images.update({f"ood-{name}": load_dataset(spec, shape) for name, spec in args.ood.items()})

    def scores_of(label: str) -> dict[str, np.ndarray]:
        scores = score_dataset(
            model,
            images[label],
            iwae_k=args.iwae_k,
            seed=args.seed,
            batch_size=args.batch_size,
            cache=out / f".scores-{label}.npz",
            key=scores_key(info.weights_sha256, images[label], args.iwae_k, args.seed),
            desc=label,
        )
        return with_fitted(scores)

    scores_in = scores_of("in")
    results: dict[str, dict] = {}
    all_sets = {IN_DISTRIBUTION: scores_in}
    for name in args.ood:
        scores_out = scores_of(f"ood-{name}")
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
    atomic_write_bytes(out / "report.md", markdown_report(report).encode())
    atomic_write_json(out / "metrics.json", report)  # last: the results' commit point
    for label in ["in", *(f"ood-{n}" for n in args.ood)]:
        (out / f".scores-{label}.npz").unlink(missing_ok=True)
    return report


def markdown_report(report: dict) -> str:
    lines = [
        f"# OOD evaluation of `{report['checkpoint']['name']}`",
        "",
        f"In-distribution: `{report['in_distribution']}` ({report['sizes'][IN_DISTRIBUTION]} "
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
