"""Which flat images does an energy let through? Fashion-MNIST model, constants by level.

Scores the energy study's 1000 in-distribution test images (5000-5999) and its 1000
constant images (levels spread evenly over 0..255), then, per tenth of the intensity
range, reports the mean energy and -log p_vae (nats) of its constants and the share of
(in-distribution, constant) pairs each score ranks the wrong way round (the constant no
more OOD than the test image). The AUROC's shortfall is the count-weighted mean of those
shares. It also reports where the training images' own mean levels lie: a strong blur,
one of the corruptions ``vaebm train ebm`` can push up, flattens an image towards that
level.

    python benchmarks/constant_levels.py --run checkpoints/fashion-mnist --name shipped

Records the table under ``--name`` in docs/constant-levels.json (other entries kept).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from command_line import this_command
from ood_benchmark import sets_for

from model.checkpoint import atomic_write_json, load_checkpoint
from model.device import select_device
from model.metrics import auroc
from model.scores import compute_scores
from training.data import ImageShape, load_dataset

REPO = Path(__file__).resolve().parent.parent
BINS = 10
COMPARED = ("iwae_bpd", "vaebm_bpd")


def wrong_way_share(inside: np.ndarray, outside: np.ndarray) -> float:
    """Share of (inside, outside) pairs where the outside score is not higher, ties
    counted half: one minus the AUROC of these two sets."""
    return 1.0 - auroc(inside, outside)


def percentiles(values: np.ndarray) -> list[float]:
    return np.percentile(values, [5, 50, 95]).round(1).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a Fashion-MNIST checkpoint directory")
    parser.add_argument("--name", required=True, help="key of the entry in the JSON file")
    parser.add_argument("--shared", default="../shared/datasets")
    parser.add_argument("--iwae-k", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "constant-levels.json")
    args = parser.parse_args()

    model, info = load_checkpoint(args.run, select_device(args.device))
    shape = ImageShape(*model.vae.image_shape[:2])
    train_spec, _, test_spec, ood = sets_for("fashion-mnist", Path(args.shared), n=1000, n_cal=0)
    images = {
        "in": load_dataset(test_spec, shape),
        "constant": load_dataset(ood["constant"], shape),
    }
    scores = {k: compute_scores(model, v, iwae_k=args.iwae_k) for k, v in images.items()}
    nats = np.log(2) * np.prod(model.vae.image_shape)  # bits/dim -> nats per image
    levels = images["constant"].reshape(len(images["constant"]), -1)[:, 0].astype(float)
    rows = []
    for b in range(BINS):
        lo, hi = 256 * b / BINS, 256 * (b + 1) / BINS
        pick = (levels >= lo) & (levels < hi)
        const = {k: v[pick] for k, v in scores["constant"].items()}
        rows.append(
            {
                "levels": [int(np.ceil(lo)), int(np.ceil(hi)) - 1],
                "count": int(pick.sum()),
                "energy_mean": round(float(const["energy"].mean()), 1),
                "nll_nats_mean": round(float(const["iwae_bpd"].mean() * nats), 1),
                **{
                    f"wrong_way_{k}": round(wrong_way_share(scores["in"][k], const[k]), 4)
                    for k in COMPARED
                },
            }
        )
    inside = scores["in"]
    entry = {
        "weights_sha256": info.weights_sha256,
        "in_distribution_percentiles_5_50_95": {
            "energy": percentiles(inside["energy"]),
            "nll_nats": percentiles(inside["iwae_bpd"] * nats),
        },
        "training_image_mean_level_percentiles_1_50_99_100": np.percentile(
            load_dataset(train_spec, shape).mean(axis=(1, 2, 3)), [1, 50, 99, 100]
        )
        .round(1)
        .tolist(),
        "by_level": rows,
        "command": this_command(),
    }
    entries = json.loads(args.out.read_text()) if args.out.exists() else {}
    entries[args.name] = entry
    atomic_write_json(args.out, entries)
    print("in-distribution 5/50/95%:", entry["in_distribution_percentiles_5_50_95"])
    print(
        "training images' mean level 1/50/99/100%:",
        entry["training_image_mean_level_percentiles_1_50_99_100"],
    )
    print("levels    energy  nll_nats  wrong-way: iwae   vaebm")
    for r in rows:
        lo, hi = r["levels"]
        print(
            f"{lo:3d}-{hi:3d} {r['energy_mean']:9.1f} {r['nll_nats_mean']:9.1f}"
            f" {r['wrong_way_iwae_bpd']:16.4f} {r['wrong_way_vaebm_bpd']:7.4f}"
        )


if __name__ == "__main__":
    main()
