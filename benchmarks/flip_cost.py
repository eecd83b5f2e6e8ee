"""What does mirroring an in-distribution image cost, under the VAE and under the energy?

The paper trains its energy on randomly flipped positives; ours are trained without
flips unless ``--flip`` is given. This scores test images 5000-5999 as they are and
mirrored left to right (IWAE k = 8, seed 0) and reports, for ``iwae_bpd`` (bits/dim) and
``energy`` (nats), the mean of each, the median of the per-image difference (mirrored minus
as is; positive = mirroring makes the image look more out-of-distribution) and the share
of images that mirroring makes costlier:

    python benchmarks/flip_cost.py --shared ../shared/datasets \\
        --run shipped=checkpoints/fashion-mnist --run flip=runs/flip-w4-s0

Writes docs/flip-cost.json (one entry per run name, others kept).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from command_line import this_command
from named_runs import measure_runs
from ood_benchmark import sets_for

from model.checkpoint import CheckpointInfo
from model.device import select_device
from model.scores import score_in_batches
from model.vaebm import VAEBM
from training.data import ImageShape, load_dataset

REPO = Path(__file__).resolve().parent.parent
COMPARED = ("iwae_bpd", "energy")


def mirrored(images: np.ndarray) -> np.ndarray:
    """Images (N, C, H, W) flipped left to right."""
    return np.ascontiguousarray(images[..., ::-1])


def flip_cost(as_is: np.ndarray, flipped: np.ndarray) -> dict[str, float]:
    """Means of a score on the images as they are and mirrored, the median per-image
    difference (mirrored minus as is) and the share of images mirroring makes costlier."""
    difference = flipped.astype(np.float64) - as_is.astype(np.float64)
    return {
        "mean_as_is": round(float(as_is.mean()), 4),
        "mean_mirrored": round(float(flipped.mean()), 4),
        "median_difference": round(float(np.median(difference)), 4),
        "share_costlier_mirrored": round(float((difference > 0).mean()), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", default="../shared/datasets")
    parser.add_argument("--run", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--n", type=int, default=1000, help="test images from 5000 on")
    parser.add_argument("--iwae-k", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "flip-cost.json")
    args = parser.parse_args()

    def measure(model: VAEBM, info: CheckpointInfo) -> dict:
        _, _, test_spec, _ = sets_for(info.name, Path(args.shared), n=args.n, n_cal=0)
        images = load_dataset(test_spec, ImageShape(*model.vae.image_shape[:2]))
        plain, flipped = (
            score_in_batches(model, x, batch_size=250, iwae_k=args.iwae_k, seed=0)
            for x in (images, mirrored(images))
        )
        return {k: flip_cost(plain[k], flipped[k]) for k in COMPARED}

    measure_runs(
        args.run, measure, out=args.out, command=this_command(), device=select_device(args.device)
    )


if __name__ == "__main__":
    main()
