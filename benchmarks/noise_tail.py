"""Which test images outrank uniform noise, score by score (Fashion-MNIST model).

Scores test images 5000-9999 and 5000 uniform-noise images, as the OOD benchmark does,
and reports the percentiles of ``elbo_bpd``, the WebP length and the earlier default
(``elbo_complexity_webp_bpd``) for both, the in-distribution images that outscore the
least OOD-looking noise image, and the AUROC with the code length capped at the raw
8 bits/dim; then, for each of ``TAIL_SCORES`` (the calibration's two fitted typicality
scores, ``vaebm_bpd`` and ``iwae_bpd``), the AUROC and the test images that outscore some
noise image:

    python benchmarks/noise_tail.py --shared ../shared/datasets

Writes docs/noise-tail.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from command_line import this_command
from joint_typicality import statistics
from ood_benchmark import sets_for

from model.calibration_file import load_calibration
from model.checkpoint import atomic_write_json, load_checkpoint
from model.device import select_device
from model.metrics import auroc
from training.data import ImageShape, load_dataset

REPO = Path(__file__).resolve().parent.parent
PERCENTILES = [0, 1, 5, 50, 95, 99, 100]


TAIL_SCORES = ("typicality_nats", "vaebm_typicality_nats", "vaebm_bpd", "iwae_bpd")


def score_tail(values: dict[str, np.ndarray], first_test_index: int) -> dict:
    """AUROC of one score on noise, the noise's range, and the test images (by index in
    the test file) that score above the least OOD-looking noise image."""
    inside, noise = values["in-distribution"], values["uniform-noise"]
    above = np.flatnonzero(inside > noise.min())
    return {
        "auroc": auroc(inside, noise),
        "noise_min_max": [round(float(noise.min()), 3), round(float(noise.max()), 3)],
        "in_distribution_above_lowest_noise": {
            "test_index": (above + first_test_index).tolist(),
            "values": inside[above].round(3).tolist(),
            "share_of_noise_below": [round(float((noise < inside[i]).mean()), 4) for i in above],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", default="../shared/datasets")
    parser.add_argument("--checkpoint", default=str(REPO / "checkpoints" / "fashion-mnist"))
    parser.add_argument("--iwae-k", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "noise-tail.json")
    args = parser.parse_args()

    model, info = load_checkpoint(args.checkpoint, select_device(args.device))
    calibration = load_calibration(args.checkpoint, weights_sha256=info.weights_sha256)
    shape = ImageShape(*model.vae.image_shape[:2])
    _, _, test_images, ood = sets_for("fashion-mnist", Path(args.shared), n=5000, n_cal=0)
    sets = {"in-distribution": test_images, "uniform-noise": ood["uniform-noise"]}
    reported = ("elbo_bpd", "webp_bpd", "elbo_complexity_webp_bpd")
    parts, tails = {}, {score: {} for score in TAIL_SCORES}
    for name, spec in sets.items():
        values = calibration.with_fitted_scores(
            statistics(load_dataset(spec, shape), model, args.iwae_k)
        )
        parts[name] = {k: values[k] for k in reported}
        for score in TAIL_SCORES:
            tails[score][name] = values[score]
    inside, noise = parts["in-distribution"], parts["uniform-noise"]
    lowest_noise = noise["elbo_complexity_webp_bpd"].min()
    above = inside["elbo_complexity_webp_bpd"] > lowest_noise

    def capped(p: dict) -> np.ndarray:
        return p["elbo_bpd"] - np.minimum(p["webp_bpd"], 8.0)

    report = {
        "percentiles": PERCENTILES,
        "sets": {
            name: {k: np.percentile(v, PERCENTILES).round(3).tolist() for k, v in p.items()}
            for name, p in parts.items()
        },
        "auroc_default": auroc(
            inside["elbo_complexity_webp_bpd"], noise["elbo_complexity_webp_bpd"]
        ),
        "auroc_elbo_bpd": auroc(inside["elbo_bpd"], noise["elbo_bpd"]),
        "auroc_code_length_capped_at_8": auroc(capped(inside), capped(noise)),
        "in_distribution_above_lowest_noise": {
            "count": int(above.sum()),
            "elbo_bpd": inside["elbo_bpd"][above].round(3).tolist(),
            "webp_bpd": inside["webp_bpd"][above].round(3).tolist(),
        },
        **{score: score_tail(tails[score], first_test_index=5000) for score in TAIL_SCORES},
        "weights_sha256": info.weights_sha256,
        "command": this_command(),
    }
    atomic_write_json(args.out, report)
    print({k: v for k, v in report.items() if k.startswith("auroc")})
    print("in-distribution images above the lowest noise score:", int(above.sum()))
    for score in TAIL_SCORES:
        print(f"{score}:", report[score])


if __name__ == "__main__":
    main()
