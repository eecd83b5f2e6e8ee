"""`vaebm calibrate`: thresholds and conformal p-value tables from held-out images.

The held-out in-distribution images are split in two (seeded): the first half sets
each score's threshold ``tau = quantile(s, 1 - alpha, "higher")`` and its p-value
table; the second half measures the false-positive rate that threshold really
achieves, with a bootstrap 95% interval. The first half is also the reference of the
fitted scores (``typicality_nats`` and its kin); its own images get leave-one-out
values, so that their threshold holds for new images. The result is written atomically as
calibration.json next to the weights it belongs to, with a Markdown report and
histograms.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import training.flags as flags
from model.calibration import calibrate_score
from model.calibration_file import CALIBRATION_NAME, Calibration, save_calibration
from model.checkpoint import atomic_write_bytes, load_checkpoint
from model.device import select_device
from model.scores import DEFAULT_SCORE, SCORES, UNFITTED_DEFAULT_SCORE
from model.typicality import TYPICALITY_SCORES, TypicalityReference
from training.data import ImageShape, load_dataset
from training.flags import checked
from training.plots import score_histograms
from training.runtime import remove_stale_temp_files
from training.scoring import score_dataset, scores_key

log = logging.getLogger(__name__)
REPORT_NAME, HISTOGRAMS_NAME = "calibration_report.md", "calibration_histograms.png"
OUTPUT_NAMES = (REPORT_NAME, HISTOGRAMS_NAME, CALIBRATION_NAME)  # written in this order
SCORE_CACHE_NAME = ".calibration_scores.npz"  # scores so far: a killed run resumes


@dataclass
class CalibrateArgs:
    """Settings of ``vaebm calibrate``; each is a flag.

    Parameters
    ----------
    checkpoint : str
        Checkpoint directory to calibrate; calibration.json and the report are
        written into it. Required: a default would overwrite the calibration of
        whichever checkpoint it names.
    data : str
        Data source spec of held-out in-distribution images (never the training
        set), in any form --data of `vaebm train` takes, e.g. my_heldout_images/ or
        t10k-images-idx3-ubyte.gz@0:5000.
        Required: no default can know which images are in-distribution for a
        checkpoint, and a wrong guess overwrites its calibration.
    target_fpr : float
        alpha, the share of in-distribution images each threshold may flag as OOD;
        at least 1/n for n calibration images, at most 0.5.
    holdout_fraction : float
        Share of the images kept aside to measure the false-positive rate the
        thresholds achieve; the rest set them.
    default_score : str
        The score that decides (see model/scores.py). Empty: the benchmark's
        choice, or a score that needs no fitting (with a warning) where these
        images are too few to fit it.
    iwae_k : int
        Importance samples of the IWAE bound behind iwae_bpd and vaebm_bpd.
    batch_size : int
        Images scored at once.
    n_boot : int
        Bootstrap resamples of the 95% interval of the achieved false-positive rate.
    seed : int
        Seed of the split and of the scores' sampling.
    device : str
        auto (CUDA when present, CPU otherwise), cpu, cuda or cuda:N.
    """

    checkpoint: str
    data: str = flags.checked_required(flags.data_spec)
    target_fpr: float = checked(0.05, flags.in_range(float, 0, 0.5, low_open=True))
    holdout_fraction: float = checked(0.5, flags.open_fraction)
    default_score: str = checked("", flags.one_of("", *SCORES))
    iwae_k: int = checked(16, flags.iwae_k)
    batch_size: int = checked(64, flags.positive_int)
    n_boot: int = checked(1000, flags.positive_int)
    seed: int = checked(0, flags.seed)
    device: str = checked("auto", flags.device)


def split_for_calibration(args: CalibrateArgs, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """The (calibration, held-out) indices, refusing too few images for them, for
    --target-fpr and for a fitted --default-score before any image is scored (the
    scoring takes minutes on a CPU)."""
    order = np.random.default_rng(args.seed).permutation(n_images)
    n_holdout = holdout_count(n_images, args.holdout_fraction)
    cal_idx, holdout_idx = order[n_holdout:], order[:n_holdout]
    n = len(cal_idx)
    given = f"--data {args.data} yields {n_images} images"
    if n == 0 or n_holdout == 0:
        total = images_needed(1, args.holdout_fraction)
        raise flags.FlagError(
            f"{given}: too few to calibrate on some and check on the others "
            f"(--holdout-fraction {args.holdout_fraction:g}); "
            + (
                "use a --holdout-fraction nearer 0.5"
                if total is None
                else f"use at least {total} images"
            )
        )
    split_text = (
        f"{given}, {n} of them to calibrate on (--holdout-fraction {args.holdout_fraction:g})"
    )
    if n < 2:
        raise flags.FlagError(
            f"{split_text}: at least 2 calibration images are needed for any --target-fpr "
            f"(at most 0.5); {use_at_least(2, args.holdout_fraction)}"
        )
    if not 1 / n <= args.target_fpr:
        needed = calibration_images_needed(args.target_fpr)
        raise flags.FlagError(
            f"--target-fpr must be in [1/n, 0.5] = [{1 / n:.4g}, 0.5] for n={n} calibration "
            f"images, got {args.target_fpr:g}: {use_at_least(needed, args.holdout_fraction)} "
            f"or a --target-fpr of at least {1 / n:.4g}"
        )
    statistics = TYPICALITY_SCORES.get(args.default_score)
    if statistics is not None and n <= len(statistics) + 1:
        raise flags.FlagError(
            f"{split_text}: --default-score {args.default_score} needs more than "
            f"{len(statistics) + 1} to be fitted; "
            f"{use_at_least(len(statistics) + 2, args.holdout_fraction)} or another "
            "--default-score"
        )
    return cal_idx, holdout_idx


# The most images an error advises giving: past it a count is no advice, and computing
# it would divide by a --target-fpr or --holdout-fraction that the CPU device (which
# flushes subnormal floats) takes for zero, or count up to it one image at a time.
MAX_ADVISED_IMAGES = 10**12


def use_at_least(n_calibration: int | None, holdout_fraction: float) -> str:
    """'use at least N images', N the fewest whose split keeps ``n_calibration`` images
    to calibrate on, or 'use more images' where N is past MAX_ADVISED_IMAGES (or
    ``n_calibration`` is None, the same)."""
    total = None if n_calibration is None else images_needed(n_calibration, holdout_fraction)
    return "use more images" if total is None else f"use at least {total} images"


def calibration_images_needed(target_fpr: float) -> int | None:
    """The fewest calibration images n with 1/n <= target_fpr (the check's own rule), or
    None where that is past MAX_ADVISED_IMAGES."""
    if not target_fpr * MAX_ADVISED_IMAGES >= 1:
        return None
    n = max(2, math.floor(1 / target_fpr))  # 1/n >= target_fpr: at most one short
    while not 1 / n <= target_fpr:
        n += 1
    return n


def images_needed(n_calibration: int, holdout_fraction: float) -> int | None:
    """The fewest images whose split keeps ``n_calibration`` images to calibrate on and
    at least one aside, so that an error can say how many images to give; None where
    that is past about MAX_ADVISED_IMAGES."""
    kept = 1 - holdout_fraction
    if not (
        holdout_fraction * MAX_ADVISED_IMAGES >= 1 and kept * MAX_ADVISED_IMAGES >= n_calibration
    ):
        return None
    # No fewer can do: one image aside needs total * fraction >= 0.5, and n_calibration
    # kept need total * (1 - fraction) >= n_calibration - 0.5. Both kept and aside
    # grow with total, so the count from that bound takes a few steps.
    total = max(
        n_calibration + 1,
        math.floor((n_calibration - 0.5) / kept) - 2,
        math.floor(0.5 / holdout_fraction) - 2,
    )
    while not (
        total - holdout_count(total, holdout_fraction) >= n_calibration
        and holdout_count(total, holdout_fraction) >= 1
    ):
        total += 1
    return total


def holdout_count(n_images: int, holdout_fraction: float) -> int:
    """How many of ``n_images`` are kept aside to measure the FPR achieved (the rest
    calibrate): the split's one rule, which the advice on how many to give follows."""
    return round(n_images * holdout_fraction)


def calibrate(args: CalibrateArgs) -> Calibration:
    """Score the held-out images, set thresholds, write calibration.json and a report.

    Every setting, the checkpoint, that it can be written to, and the images are
    checked before the first image is scored (minutes on a CPU).
    """
    flags.validate_fields(args)
    directory = Path(args.checkpoint)
    model, info = load_checkpoint(directory, select_device(args.device))
    flags.check_writable_directory(directory, "--checkpoint")
    flags.check_output_files(directory, OUTPUT_NAMES, "--checkpoint")
    remove_stale_temp_files(directory, (*OUTPUT_NAMES, SCORE_CACHE_NAME))
    images = load_dataset(args.data, ImageShape(*model.vae.image_shape[:2]))
    cal_idx, holdout_idx = split_for_calibration(args, len(images))
    n, n_holdout = len(cal_idx), len(holdout_idx)
    scores = score_dataset(
        model,
        images,
        iwae_k=args.iwae_k,
        seed=args.seed,
        batch_size=args.batch_size,
        cache=directory / SCORE_CACHE_NAME,
        key=scores_key(info.weights_sha256, images, args.iwae_k, args.seed),
        desc="calibrating",
    )
    typicality = {}
    for name, statistics in TYPICALITY_SCORES.items():
        try:
            typicality[name], scores[name] = fit_typicality(
                scores, cal_idx, holdout_idx, statistics
            )
        except ValueError as exc:  # too few images, or statistics that do not vary
            unfitted = f"{name} cannot be fitted on {args.data}: {exc}"
            if args.default_score == name:
                raise ValueError(f"{unfitted}; choose another --default-score") from exc
            log.warning("%s; it is left out of the calibration", unfitted)
    default_score = args.default_score or DEFAULT_SCORE
    if default_score not in scores:
        log.warning("default score %s unavailable, using %s", default_score, UNFITTED_DEFAULT_SCORE)
        default_score = UNFITTED_DEFAULT_SCORE
    calibration = Calibration(
        weights_sha256=info.weights_sha256,
        target_fpr=args.target_fpr,
        default_score=default_score,
        scores={
            name: calibrate_score(
                name,
                values[cal_idx],
                values[holdout_idx],
                target_fpr=args.target_fpr,
                n_boot=args.n_boot,
                seed=args.seed,
            )
            for name, values in scores.items()
        },
        iwae_k=args.iwae_k,
        seed=args.seed,
        data={
            "source": args.data,
            "n_calibration": n,
            "n_holdout": n_holdout,
            "holdout_fraction": args.holdout_fraction,
            "split_seed": args.seed,
        },
        typicality=typicality,
    )
    # calibration.json last: it is the commit point, so a failure in the report or the
    # plot leaves the previous calibration (the one the service loads) as it was.
    write_report(directory, calibration, scores, cal_idx, holdout_idx)
    save_calibration(directory, calibration)
    (directory / SCORE_CACHE_NAME).unlink(missing_ok=True)
    return calibration


def fit_typicality(
    scores: dict[str, np.ndarray],
    cal_idx: np.ndarray,
    holdout_idx: np.ndarray,
    statistics: tuple[str, ...],
) -> tuple[TypicalityReference, np.ndarray]:
    """The reference of the calibration images' ``statistics`` and the fitted score for
    every image: leave-one-out for the reference's own, plain for the held-out ones."""
    reference = TypicalityReference.fit({k: v[cal_idx] for k, v in scores.items()}, statistics)
    values = np.empty(len(cal_idx) + len(holdout_idx))
    values[cal_idx] = reference.leave_one_out()
    values[holdout_idx] = reference.negative_log_density(
        {k: v[holdout_idx] for k, v in scores.items()}
    )
    return reference, values


def write_report(
    directory: Path,
    calibration: Calibration,
    scores: dict[str, np.ndarray],
    cal_idx: np.ndarray,
    holdout_idx: np.ndarray,
) -> None:
    """calibration_report.md and calibration_histograms.png beside calibration.json."""
    thresholds = {name: c.threshold for name, c in calibration.scores.items()}
    score_histograms(
        directory / HISTOGRAMS_NAME,
        {
            "calibration": {k: v[cal_idx] for k, v in scores.items()},
            "held-out check": {k: v[holdout_idx] for k, v in scores.items()},
        },
        thresholds,
    )
    write_report_markdown(directory, calibration)


def write_report_markdown(directory: Path, calibration: Calibration) -> None:
    """calibration_report.md alone (e.g. again after the default score changed)."""
    d = calibration.data
    lines = [
        f"# Calibration of `{directory.name}`",
        "",
        f"Weights sha256 `{calibration.weights_sha256}`. Data: `{d['source']}`, "
        f"{d['n_calibration']} images set the thresholds, {d['n_holdout']} held-out images "
        f"measure the FPR achieved. Target FPR (alpha) {calibration.target_fpr}; IWAE k = "
        f"{calibration.iwae_k}. Default decision score: `{calibration.default_score}`.",
        "",
        *fitted_scores_text(calibration),
        "| score | unit | threshold | FPR achieved on held-out | 95% bootstrap interval |",
        "|---|---|---|---|---|",
    ]
    for name, c in calibration.scores.items():
        lines.append(
            f"| `{name}` | {SCORES[name].unit} | {c.threshold:.4f} | {c.achieved_fpr:.4f} "
            f"| [{c.fpr_ci_low:.4f}, {c.fpr_ci_high:.4f}] |"
        )
    lines += [
        "",
        "Every score: higher = more out-of-distribution; `is_ood = score > threshold`.",
        "",
        "![histograms](calibration_histograms.png)",
        "",
    ]
    atomic_write_bytes(directory / REPORT_NAME, "\n".join(lines).encode())


def fitted_scores_text(calibration: Calibration) -> list[str]:
    """The report's paragraph on the fitted scores: how their thresholds were set, which
    could not be fitted (their rows are missing), and why the default is not the
    benchmark's where that is the reason. Empty where nothing needs saying."""
    fitted = [f"`{name}`" for name in calibration.typicality]
    left_out = [f"`{name}`" for name in TYPICALITY_SCORES if name not in calibration.typicality]
    text = []
    if fitted:
        text.append(
            f"{', '.join(fitted)} {'is' if len(fitted) == 1 else 'are'} fitted on the "
            f"{calibration.data.get('n_calibration', '?')} calibration images; "
            f"{'its threshold is' if len(fitted) == 1 else 'their thresholds are'} set on "
            "those images' leave-one-out densities."
        )
    if left_out:
        text.append(
            f"Left out, as these images could not fit {'it' if len(left_out) == 1 else 'them'} "
            f"(too few, or statistics that do not vary; see the log): {', '.join(left_out)}."
        )
    fell_back = DEFAULT_SCORE not in calibration.scores
    if fell_back and calibration.default_score == UNFITTED_DEFAULT_SCORE:
        text.append(
            f"`{UNFITTED_DEFAULT_SCORE}` decides because `{DEFAULT_SCORE}`, the benchmark's "
            "choice, could not be fitted."
        )
    return [" ".join(text), ""] if text else []
