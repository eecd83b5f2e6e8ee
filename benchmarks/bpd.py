"""Test-set bits/dim of the shipped VAEs (importance-weighted bound and ELBO).

    python benchmarks/bpd.py --shared ../shared/datasets --iwae-k 64

Scores all 10k test images of each model's own data set and writes
docs/test-bpd.json. Goal from the foundation issue: at most 1.4 (MNIST) and
3.4 (Fashion-MNIST) bits/dim.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from model.checkpoint import atomic_write_json, load_checkpoint
from model.device import select_device
from model.likelihood import to_unit_range
from training.data import ImageShape, load_dataset

GOALS = {"mnist": 1.4, "fashion-mnist": 3.4}


@torch.no_grad()
def test_set_bpd(checkpoint: Path, spec: str, k: int, device: torch.device, seed: int) -> dict:
    model, info = load_checkpoint(checkpoint, device)
    torch.manual_seed(seed)
    images = torch.from_numpy(load_dataset(spec, ImageShape(*model.vae.image_shape[:2])))
    to_bpd = 1.0 / (model.vae.config.num_dims * math.log(2.0))
    iwae_sum = elbo_sum = 0.0
    started = time.time()
    for chunk in tqdm(images.split(max(1024 // k, 4)), desc=f"{checkpoint.name} k={k}"):
        iwae, elbo = model.vae.iwae_and_elbo(to_unit_range(chunk.to(device)), k)
        iwae_sum += float(-iwae.sum()) * to_bpd
        elbo_sum += float(-elbo.sum()) * to_bpd
    return {
        "checkpoint": str(checkpoint),
        "weights_sha256": info.weights_sha256,
        "data": spec,
        "n": len(images),
        "iwae_k": k,
        "iwae_bpd": iwae_sum / len(images),
        "elbo_bpd": elbo_sum / len(images),
        "seconds": time.time() - started,
        "goal_bpd": GOALS.get(checkpoint.name),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default="../shared/datasets")
    parser.add_argument("--checkpoints", default="checkpoints")
    parser.add_argument("--models", nargs="+", default=["fashion-mnist", "mnist"])
    parser.add_argument("--iwae-k", type=int, default=64)
    parser.add_argument("--limit", type=int, default=10000, help="test images per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="docs/test-bpd.json")
    args = parser.parse_args()
    device = select_device(args.device)
    results = {
        name: test_set_bpd(
            Path(args.checkpoints) / name,
            f"{args.shared}/{name}/t10k-images-idx3-ubyte.gz@0:{args.limit}",
            args.iwae_k,
            device,
            args.seed,
        )
        for name in args.models
    }
    atomic_write_json(args.out, results)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
