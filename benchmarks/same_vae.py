"""Does a retrained VAE match a shipped one, tensor for tensor?

The shipped checkpoints say they were trained by our own ``vaebm train``
(``benchmarks/train_shipped.sh``, history in ``docs/training.md``). Training on one CPU
thread is deterministic on one machine, so retraining there with the same commands should
give the same VAE bit for bit; this checks it. Another CPU's kernels round differently,
and the differences grow over training: there, expect the same quality, not the same
bits. It compares only the VAE (stage 1): the energy of a VAE stage is an untrained
placeholder.

    python benchmarks/same_vae.py runs/fmnist-seed0-vae-h32 checkpoints/fashion-mnist

Prints how many VAE tensors are bitwise equal and the largest absolute difference, and
exits with status 1 if any differs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from model.checkpoint import load_checkpoint
from model.vaebm import VAEBM


def vae_differences(first: VAEBM, second: VAEBM) -> dict[str, float]:
    """Largest absolute difference of each VAE tensor, by name (0.0 only where the two
    tensors are bitwise equal; ``inf`` where their shapes differ or one lacks it)."""
    ours, theirs = first.vae.state_dict(), second.vae.state_dict()
    differences = {}
    for name in sorted(set(ours) | set(theirs)):
        a, b = ours.get(name), theirs.get(name)
        if a is None or b is None or a.shape != b.shape:
            differences[name] = float("inf")
        elif torch.equal(a, b):
            differences[name] = 0.0
        else:
            differences[name] = float((a.double() - b.double()).abs().max())
    return differences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path, help="a checkpoint directory")
    parser.add_argument("second", type=Path, help="the checkpoint directory to compare with")
    args = parser.parse_args()
    differences = vae_differences(load_checkpoint(args.first)[0], load_checkpoint(args.second)[0])
    equal = sum(d == 0.0 for d in differences.values())
    print(
        f"VAE tensors bitwise equal: {equal} of {len(differences)}; "
        f"largest absolute difference {max(differences.values()):.3g}"
    )
    sys.exit(0 if equal == len(differences) else 1)


if __name__ == "__main__":
    main()
