"""Which in-distribution images does the energy find strangest, and is noise among them?

The Fashion-MNIST pair with uniform noise is lost by ``vaebm_bpd`` through a few test
images whose energy exceeds that of the least strange noise image by more than the VAE's
likelihood separates them. For each energy (a checkpoint directory, its VAE frozen), this
computes E(x) in nats on the benchmark's in-distribution images (test images 5000-9999)
and on its 5000 uniform-noise images, and reports, in standard deviations of the test
images' energy above their median: the noise's range, the ``--top`` highest-energy test
images (by index in the test file), and how many test images cost more energy than the
cheapest noise image; with the energy's AUROC on the pair. To tell a rare kind of image
from a failure to generalise, it also gives quantiles of the energy, in the same units, on
the test images and on ``--train-images`` images the energy was trained on (the first of
the checkpoint's own training split):

    python benchmarks/energy_tail.py --shared ../shared/datasets \\
        --run shipped=checkpoints/fashion-mnist --run flip=runs/flip-w4-s0

Writes docs/energy-tail.json (one entry per run name, others kept).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from command_line import this_command
from energy_weight import data_energies
from named_runs import measure_runs
from ood_benchmark import sets_for

from model.checkpoint import CheckpointInfo
from model.device import select_device
from model.metrics import auroc
from model.vaebm import VAEBM
from training.data import ImageShape, checkpoint_split, load_dataset

REPO = Path(__file__).resolve().parent.parent
FIRST_TEST_INDEX = 5000  # the benchmark's in-distribution images are test images 5000-9999
QUANTILES = (50, 90, 99, 99.9, 100)  # percentiles reported for test and training images


def energy_tail(
    inside: np.ndarray, noise: np.ndarray, top: int, trained: np.ndarray | None = None
) -> dict:
    """Summary of where noise falls in the in-distribution energies (nats, higher = more OOD).

    Offsets are in standard deviations of ``inside`` above its median, so runs whose
    energies drifted to different scales can be compared. With ``trained`` (energies of
    images the energy was trained on), the ``QUANTILES`` of both sets in those units: a
    test tail far above the training tail would mean the energy overfits its positives."""
    inside, noise = inside.astype(np.float64), noise.astype(np.float64)
    median, spread = float(np.median(inside)), float(inside.std())

    def z(values: np.ndarray) -> list[float]:
        return np.round((values - median) / spread, 2).tolist()

    order = np.argsort(-inside, kind="stable")[:top]
    summary = {
        "energy_std_nats": round(spread, 1),
        "auroc_energy": auroc(inside, noise),
        "noise_sd_above_median_min_max": z(np.array([noise.min(), noise.max()])),
        "top_test_images": {
            "test_index": (order + FIRST_TEST_INDEX).tolist(),
            "sd_above_median": z(inside[order]),
        },
        "test_images_above_cheapest_noise": int((inside > noise.min()).sum()),
    }
    if trained is not None:
        summary["quantiles_sd_above_median"] = {
            "percentiles": list(QUANTILES),
            "test": z(np.percentile(inside, QUANTILES)),
            "train": z(np.percentile(trained.astype(np.float64), QUANTILES)),
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", default="../shared/datasets")
    parser.add_argument("--run", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--train-images", type=int, default=5000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "energy-tail.json")
    args = parser.parse_args()

    train_spec, _, test_spec, ood = sets_for("fashion-mnist", Path(args.shared), 5000, n_cal=0)

    def measure(model: VAEBM, info: CheckpointInfo) -> dict:
        shape = ImageShape(*model.vae.image_shape[:2])
        inside = data_energies(model, load_dataset(test_spec, shape), batch=250)
        noise = data_energies(model, load_dataset(ood["uniform-noise"], shape), batch=250)
        trained, _ = checkpoint_split(load_dataset(train_spec, shape), info.data)
        trained = data_energies(model, trained[: args.train_images], batch=250)
        return energy_tail(inside, noise, args.top, trained)

    measure_runs(
        args.run, measure, out=args.out, command=this_command(), device=select_device(args.device)
    )


if __name__ == "__main__":
    main()
