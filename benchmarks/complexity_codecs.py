"""Which lossless codec should measure input complexity? (Serrà et al. 2020)

For the Fashion-MNIST model: AUROC of ``elbo_bpd - L(x)`` with L the compressed length
(bits/dim) under PNG, WebP lossless at method 4 (libwebp's default) and 6 (most
effort), and JPEG 2000 lossless, on test images 5000-5999 against 1000 images of each
OOD set; the time each codec takes per image; and one fusion tried for uniform noise
(the larger of the calibrated robust z-values of ``elbo_bpd`` and
``elbo_bpd - L_webp``, calibrated on test images 0-999).

    python benchmarks/complexity_codecs.py --shared ../shared/datasets

Writes docs/complexity-codecs.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from command_line import this_command

from model.checkpoint import load_checkpoint
from model.complexity import LOSSLESS_CODECS, encoded_bits_per_dim
from model.device import select_device
from model.metrics import auroc
from model.scores import score_in_batches
from training.data import ImageShape, load_dataset

REPO = Path(__file__).resolve().parent.parent
CODECS = {
    "png": LOSSLESS_CODECS["png"],
    "webp-method4": LOSSLESS_CODECS["webp"],
    "webp-method6": {**LOSSLESS_CODECS["webp"], "method": 6},
    "jpeg2000": {"format": "JPEG2000", "irreversible": False},
}


def compressed_bpd(images: np.ndarray, options: dict) -> tuple[np.ndarray, float]:
    """Bits/dim of each image under one codec, and milliseconds per image."""
    started = time.perf_counter()
    lengths = encoded_bits_per_dim(images, options)
    return lengths, 1000 * (time.perf_counter() - started) / len(images)


def robust_z(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(values - median) / IQR of the reference (calibration) scores."""
    q25, q50, q75 = np.percentile(reference, [25, 50, 75])
    return (values - q50) / (q75 - q25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", default="../shared/datasets")
    parser.add_argument("--checkpoint", default=str(REPO / "checkpoints" / "fashion-mnist"))
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--iwae-k", type=int, default=8)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "complexity-codecs.json")
    args = parser.parse_args()
    s, n = args.shared, args.n
    sets = {
        "calibration": f"{s}/fashion-mnist/t10k-images-idx3-ubyte.gz@0:{n}",
        "in": f"{s}/fashion-mnist/t10k-images-idx3-ubyte.gz@5000:{5000 + n}",
        "mnist": f"{s}/mnist/t10k-images-idx3-ubyte.gz@5000:{5000 + n}",
        "cifar10-gray": f"{s}/cifar10/cifar10_test_jpg.tar.gz@0:{n}",
        "uniform-noise": f"noise:{n}",
        "constant": f"constant:{n}",
        "sklearn-digits": f"sklearn-digits@0:{n}",
    }
    model, _ = load_checkpoint(args.checkpoint, select_device("auto"))
    elbo, lengths, ms = {}, {c: {} for c in CODECS}, {c: [] for c in CODECS}
    for name, spec in sets.items():
        images = load_dataset(spec, ImageShape(1, 28))
        with torch.no_grad():
            elbo[name] = score_in_batches(model, images, batch_size=64, iwae_k=args.iwae_k)[
                "elbo_bpd"
            ]
        for codec, options in CODECS.items():
            lengths[codec][name], per_image = compressed_bpd(images, options)
            ms[codec].append(per_image)
        print(f"scored {name}", flush=True)
    ood = [k for k in sets if k not in ("calibration", "in")]
    table: dict[str, dict] = {}
    for codec in CODECS:
        score = {k: elbo[k] - lengths[codec][k] for k in sets}
        table[f"elbo_bpd - {codec}"] = {
            "auroc": {o: auroc(score["in"], score[o]) for o in ood},
            "mean_bits_per_dim_in": float(lengths[codec]["in"].mean()),
            "ms_per_image": float(np.median(ms[codec])),
        }
    webp = {k: elbo[k] - lengths["webp-method4"][k] for k in sets}

    def fused(k: str) -> np.ndarray:
        return np.maximum(
            robust_z(elbo[k], elbo["calibration"]), robust_z(webp[k], webp["calibration"])
        )

    table["max z(elbo_bpd), z(elbo_bpd - webp-method4)"] = {
        "auroc": {o: auroc(fused("in"), fused(o)) for o in ood}
    }
    for row, result in table.items():
        cells = "  ".join(f"{o} {v:.4f}" for o, v in result["auroc"].items())
        extra = f"  ({result['ms_per_image']:.2f} ms/image)" if "ms_per_image" in result else ""
        print(f"{row:48s} {cells}{extra}")
    report = {"sets": sets, "iwae_k": args.iwae_k, "results": table}
    report["command"] = this_command()
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
