"""Would a joint-typicality score close the default's gap on uniform noise?

The earlier default score (``elbo_complexity_webp_bpd``, now the fallback of calibrations
that cannot fit ``typicality_nats``) ranks a few Fashion-MNIST test images above uniform
noise (see docs/noise-tail.json). This study, which chose ``typicality_nats``, asks
whether flagging a *combination* of statistics atypical for in-distribution data does
better, in the spirit of DoSE (Morningstar et al. 2021): fit a Gaussian KDE (``model.typicality``,
Scott's bandwidth, full covariance) on the calibration images' statistic vectors and score an
image by the negative log density of its vector (nats; higher = more OOD). That is
two-sided: an image that is too likely or too simple for its class is flagged too.

Same images as the OOD benchmark (calibration: test images 0-4999; evaluation: test
images 5000-9999 against every OOD set), IWAE k 8, seed 0:

    python benchmarks/joint_typicality.py --shared ../shared/datasets

Writes docs/joint-typicality.json: per model and statistic set, the AUROC on every pair,
how many in-distribution images score above the least OOD-looking image of each set,
and which in-distribution image the default score ranks highest (also saved, enlarged,
as docs/highest-in-distribution-MODEL.png).
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from command_line import this_command
from ood_benchmark import sets_for
from PIL import Image

from model.checkpoint import atomic_write_bytes, atomic_write_json, load_checkpoint
from model.complexity import lossless_bits_per_dim
from model.device import select_device
from model.metrics import auroc
from model.scores import UNFITTED_DEFAULT_SCORE as UNFITTED
from model.scores import score_in_batches
from model.typicality import TypicalityReference
from training.data import ImageShape, load_dataset

REPO = Path(__file__).resolve().parent.parent
# Statistic sets tried. (elbo, elbo - webp) is an affine map of (elbo, webp), so its KDE
# ranks images as a KDE of (likelihood, compressed length) would.
STATISTIC_SETS = {
    "elbo+complexity": ("elbo_bpd", "elbo_complexity_webp_bpd"),
    "elbo+webp+energy": ("elbo_bpd", "webp_bpd", "energy"),
    "elbo+webp+iwae_gap": ("elbo_bpd", "webp_bpd", "iwae_gap_bpd"),
    "vaebm+complexity": ("vaebm_bpd", "complexity_webp_bpd"),
}


def statistics(images: np.ndarray, model, iwae_k: int) -> dict[str, np.ndarray]:
    """Every score of ``model.scores`` plus the WebP length (bits/dim), seed 0."""
    scores = score_in_batches(model, images, batch_size=64, iwae_k=iwae_k, seed=0)
    return {**scores, "webp_bpd": lossless_bits_per_dim(images, "webp")}


def save_enlarged(image: np.ndarray, path: Path, factor: int = 8) -> None:
    """One uint8 (C, H, W) image as a PNG, enlarged without smoothing so pixels show."""
    pil = Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))
    pil = pil.resize((pil.width * factor, pil.height * factor), Image.NEAREST)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def joint_negative_log_density(
    reference: dict[str, np.ndarray], names: tuple[str, ...], values: dict[str, np.ndarray]
) -> np.ndarray:
    """-log KDE density (fitted on ``reference``) of each image's statistics ``names``."""
    return TypicalityReference.fit(reference, names).negative_log_density(values)


def compare(scores: dict[str, np.ndarray], ood_names: list[str]) -> dict:
    inside = scores["in"]
    aurocs = {o: round(auroc(inside, scores[o]), 4) for o in ood_names}
    return {
        "auroc": aurocs,
        "in_above_lowest_ood": {o: int((inside > scores[o].min()).sum()) for o in ood_names},
        "worst_pair": min(aurocs.values()),
        "highest_in_distribution_image": int(np.argmax(inside)),
    }


def run_model(name: str, args: argparse.Namespace) -> dict:
    model, _ = load_checkpoint(Path(args.checkpoints) / name, select_device(args.device))
    shape = ImageShape(*model.vae.image_shape[:2])
    _, cal_spec, in_spec, ood = sets_for(name, Path(args.shared), args.n, args.n)
    specs = {"calibration": cal_spec, "in": in_spec, **ood}
    images = {k: load_dataset(v, shape) for k, v in specs.items()}
    stats = {k: statistics(v, model, args.iwae_k) for k, v in images.items()}
    evaluated = ["in", *ood]
    result = {
        "sets": specs,
        UNFITTED: compare({k: stats[k][UNFITTED] for k in evaluated}, list(ood)),
    }
    for label, names in STATISTIC_SETS.items():
        scores = {
            k: joint_negative_log_density(stats["calibration"], names, stats[k]) for k in evaluated
        }
        result[label] = {"statistics": list(names), **compare(scores, list(ood))}
    top = result[UNFITTED]["highest_in_distribution_image"]
    figure = args.out.parent / f"highest-in-distribution-{name}.png"
    save_enlarged(images["in"][top], figure)
    result["default_highest_image"] = {
        "index_in_evaluation_set": top,
        "figure": figure.name,
        "elbo_bpd": round(float(stats["in"]["elbo_bpd"][top]), 3),
        "webp_bpd": round(float(stats["in"]["webp_bpd"][top]), 3),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", default="../shared/datasets")
    parser.add_argument("--checkpoints", default=str(REPO / "checkpoints"))
    parser.add_argument("--models", nargs="+", default=["fashion-mnist", "mnist"])
    parser.add_argument("--n", type=int, default=5000, help="images per set")
    parser.add_argument("--iwae-k", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "joint-typicality.json")
    args = parser.parse_args()
    report = {
        "command": this_command(),
        "models": {name: run_model(name, args) for name in args.models},
    }
    atomic_write_json(args.out, report)
    for name, result in report["models"].items():
        for label, r in result.items():
            if isinstance(r, dict) and "auroc" in r:
                print(f"{name:14s} {label:26s} worst {r['worst_pair']:.4f} {r['auroc']}")


if __name__ == "__main__":
    main()
