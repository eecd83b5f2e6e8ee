"""The model on CUDA against the model on CPU: same scores, same decisions, same samples.

    python benchmarks/cuda_check.py --checkpoint checkpoints/fashion-mnist \
        --data ../shared/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz@0:1000

Loads one checkpoint on both devices, scores the same images with the calibration's
IWAE k and seed (posterior draws are seeded per image on the CPU, so both devices see
the same noise), and reports per score the largest absolute difference, in the score's
own units, and how many calibrated decisions differ; once as ``select_device`` sets CUDA
up (float32 convolutions) and once with PyTorch's default TF32 convolutions. Then draws
the same seeded samples twice on CUDA, with and without cuDNN's deterministic algorithms
(the service promises identical images), and times ``compute_scores`` on both devices per
batch size. Writes JSON to ``--out``. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from command_line import this_command
from timing import wall_seconds

from model.calibration_file import load_calibration
from model.checkpoint import atomic_write_json, load_checkpoint
from model.device import select_device
from model.scores import compute_scores, score_in_batches
from training.data import ImageShape, load_dataset


def score_agreement(checkpoint: Path, images: np.ndarray, batch_size: int) -> dict[str, Any]:
    """Every score on CPU and on CUDA (as select_device sets it up, and with TF32
    convolutions); per score the largest difference from CPU and the decisions differing."""
    per_device = {}
    for name in ("cpu", "cuda", "cuda-tf32"):
        model, info = load_checkpoint(checkpoint, select_device(name.removesuffix("-tf32")))
        # select_device turns off TF32 convolutions; "cuda-tf32" shows what that changes
        torch.backends.cudnn.allow_tf32 = name == "cuda-tf32"
        calibration = load_calibration(checkpoint, weights_sha256=info.weights_sha256)
        scores = score_in_batches(
            model, images, batch_size=batch_size, iwae_k=calibration.iwae_k, seed=calibration.seed
        )
        per_device[name] = calibration.with_fitted_scores(scores)
    torch.backends.cudnn.allow_tf32 = False
    out: dict[str, Any] = {}
    for score, cpu_values in per_device["cpu"].items():
        row: dict[str, Any] = {"spread_on_cpu": float(np.std(cpu_values))}
        if score in calibration.scores:
            row["flagged_on_cpu"] = int(np.sum(calibration.decide(score, cpu_values)["is_ood"]))
        for name in ("cuda", "cuda-tf32"):
            values = per_device[name][score]
            row[f"max_abs_difference_{name}"] = float(np.max(np.abs(cpu_values - values)))
            if score in calibration.scores:
                row[f"decisions_differing_{name}"] = int(
                    np.sum(
                        calibration.decide(score, cpu_values)["is_ood"]
                        != calibration.decide(score, values)["is_ood"]
                    )
                )
        out[score] = row
    return {"images": len(images), "default_score": calibration.default_score, "scores": out}


def sample_determinism(checkpoint: Path, n: int, steps: int) -> dict[str, Any]:
    """The same seed twice on CUDA, with cuDNN's deterministic algorithms (as
    select_device sets it up) and without: the service promises identical images."""
    model, _ = load_checkpoint(checkpoint, select_device("cuda"))
    out: dict[str, Any] = {"n": n, "steps": steps}
    for deterministic in (True, False):
        torch.backends.cudnn.deterministic = deterministic
        first = model.sample(n, steps=steps, seed=7).cpu()
        second = model.sample(n, steps=steps, seed=7).cpu()
        other = model.sample(n, steps=steps, seed=8).cpu()
        out[f"cudnn_deterministic_{deterministic}"] = {
            "same_seed_identical": bool(torch.equal(first, second)),
            "same_seed_max_abs_difference": float((first - second).abs().max()),
            "other_seed_max_abs_difference": float((first - other).abs().max()),
        }
    torch.backends.cudnn.deterministic = True
    return out


def throughput(checkpoint: Path, images: np.ndarray, sizes: list[int]) -> dict[str, Any]:
    """Images per second of ``compute_scores`` per device and batch size (best of 5)."""
    out: dict[str, Any] = {}
    for name in ("cpu", "cuda"):
        device = select_device(name)
        model, info = load_checkpoint(checkpoint, device)
        k = load_calibration(checkpoint, weights_sha256=info.weights_sha256).iwae_k
        out[name] = {}
        for size in sizes:
            batch = images[:size]
            call = partial(compute_scores, model, batch, iwae_k=k)
            call()  # warm-up
            best = min(wall_seconds(call, 5))
            out[name][str(size)] = {"seconds_per_call": best, "images_per_s": size / best}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/fashion-mnist"))
    parser.add_argument("--data", required=True, help="a data source spec (in-distribution)")
    parser.add_argument("--batch-size", type=int, default=64, help="forward pass size")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--sample-steps", type=int, default=16)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 32, 64, 256])
    parser.add_argument("--out", type=Path, default=Path("docs/cuda-check.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("cuda_check needs a CUDA device")
    channels, size, _ = json.loads((args.checkpoint / "config.json").read_text())["image_shape"]
    shape = ImageShape(channels, size)
    images = load_dataset(args.data, shape)
    started = time.perf_counter()
    results = {
        "command": this_command(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0),
        "checkpoint": str(args.checkpoint),
        "data": args.data,
        "agreement": score_agreement(args.checkpoint, images, args.batch_size),
        "sampling": sample_determinism(args.checkpoint, args.samples, args.sample_steps),
        "throughput": throughput(args.checkpoint, images, args.sizes),
    }
    results["wall_s"] = time.perf_counter() - started
    atomic_write_json(args.out, results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
