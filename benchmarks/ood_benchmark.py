"""OOD benchmark of the shipped checkpoints against scikit-learn peers.

For each shipped model: calibrate on the first half of its own test set (writes
checkpoints/NAME/calibration.json), evaluate on the second half against every
other data set we have, and measure, on the same images, the peers a user could
reach for with scikit-learn alone (kNN distance k=5, PCA reconstruction error with
50 components, IsolationForest), fitted on the model's training images.

    python benchmarks/ood_benchmark.py --shared ../shared/datasets --out docs

Writes docs/ood-benchmarks.md (tables), docs/ood-benchmark-results.json and one
docs/ood-benchmark-NAME.json per model (reused with --reuse).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
from command_line import this_command
from sklearn.decomposition import PCA
from sklearn.ensemble import IsolationForest
from sklearn.neighbors import NearestNeighbors

from model.calibration_file import load_calibration, save_calibration
from model.checkpoint import atomic_write_bytes, atomic_write_json, load_checkpoint
from model.device import select_device
from model.metrics import auroc
from model.scores import SCORES
from training.calibrate import CalibrateArgs, calibrate, write_report_markdown
from training.data import ImageShape, load_dataset
from training.scoring import score_dataset

log = logging.getLogger("ood_benchmark")
PEERS = ("knn5_distance", "pca50_recon_error", "isolation_forest")


def sets_for(
    model_name: str, shared: Path, n: int, n_cal: int
) -> tuple[str, str, str, dict[str, str]]:
    """(train spec, calibration spec, in-distribution eval spec, OOD specs) for a model."""
    own = shared / model_name
    other = shared / ("mnist" if model_name == "fashion-mnist" else "fashion-mnist")
    test = f"{own}/t10k-images-idx3-ubyte.gz"
    ood = {
        other.name: f"{other}/t10k-images-idx3-ubyte.gz@5000:{5000 + n}",
        "cifar10-gray": f"{shared}/cifar10/cifar10_test_jpg.tar.gz@0:{n}",
        "uniform-noise": f"noise:{n}",
        "constant": f"constant:{n}",
    }
    if model_name == "fashion-mnist":
        ood["sklearn-digits"] = f"sklearn-digits@0:{n}"
    cal = f"{test}@0:{n_cal}"
    return (f"{own}/train-images-idx3-ubyte.gz", cal, f"{test}@5000:{5000 + n}", ood)


def peer_scores(train: np.ndarray, sets: dict[str, np.ndarray], seed: int) -> dict[str, dict]:
    """Raw-pixel peers fitted on training images; every score higher = more OOD."""
    flat_train = train.reshape(len(train), -1) / 255.0
    knn = NearestNeighbors(n_neighbors=5).fit(flat_train)
    pca = PCA(n_components=50, random_state=seed).fit(flat_train)
    forest = IsolationForest(n_estimators=200, random_state=seed).fit(flat_train)
    out = {}
    for name, images in sets.items():
        x = images.reshape(len(images), -1) / 255.0
        recon = pca.inverse_transform(pca.transform(x))
        out[name] = {
            "knn5_distance": knn.kneighbors(x)[0][:, -1],
            "pca50_recon_error": ((x - recon) ** 2).sum(1),
            "isolation_forest": -forest.score_samples(x),
        }
    return out


def run_model(name: str, args: argparse.Namespace) -> dict:
    checkpoint = Path(args.checkpoints) / name
    train_spec, cal_spec, in_spec, ood_specs = sets_for(
        name, Path(args.shared), args.n, args.n_calibration
    )
    started = time.time()
    calibration = calibrate(
        CalibrateArgs(
            checkpoint=str(checkpoint),
            data=cal_spec,
            target_fpr=args.target_fpr,
            iwae_k=args.iwae_k,
            seed=args.seed,
            device=args.device,
        )
    )
    calibration_seconds = time.time() - started
    model, _ = load_checkpoint(checkpoint, select_device(args.device))
    shape = ImageShape(*model.vae.image_shape[:2])
    images = {"in": load_dataset(in_spec, shape)}
    images.update({k: load_dataset(v, shape) for k, v in ood_specs.items()})
    scores = {
        k: calibration.with_fitted_scores(
            score_dataset(model, v, iwae_k=args.iwae_k, seed=args.seed, desc=f"{name}/{k}")
        )
        for k, v in images.items()
    }
    names = list(scores["in"])
    train = load_dataset(train_spec, shape)
    peers = peer_scores(train, images, args.seed)
    table: dict[str, dict[str, float]] = {}
    for ood in ood_specs:
        row = {s: auroc(scores["in"][s], scores[ood][s]) for s in names}
        row.update({p: auroc(peers["in"][p], peers[ood][p]) for p in PEERS})
        table[ood] = row
    spread = {
        s: {"in_std": float(scores["in"][s].std()), "in_mean": float(scores["in"][s].mean())}
        for s in ("energy", "iwae_bpd", "vaebm_bpd")
    }
    nats = {
        "energy_std_nats": float(scores["in"]["energy"].std()),
        "nll_std_nats": float(
            scores["in"]["iwae_bpd"].std() * np.log(2) * model.vae.config.num_dims
        ),
    }
    thresholds = {
        s: {
            "threshold": c.threshold,
            "achieved_fpr": c.achieved_fpr,
            "ci": [c.fpr_ci_low, c.fpr_ci_high],
        }
        for s, c in calibration.scores.items()
    }
    fpr_at_threshold = {
        ood: {s: float(np.mean(scores[ood][s] <= calibration.scores[s].threshold)) for s in names}
        for ood in ood_specs
    }
    return {
        "checkpoint": str(checkpoint),
        "calibration_data": cal_spec,
        "in_distribution": in_spec,
        "ood_sets": ood_specs,
        "sizes": {k: len(v) for k, v in images.items()},
        "auroc": table,
        "spread": spread,
        "spread_nats": nats,
        "calibration": thresholds,
        "ood_accepted_at_threshold": fpr_at_threshold,
        "iwae_k": args.iwae_k,
        "seconds": time.time() - started,
        "calibration_seconds": calibration_seconds,
    }


def choose_default(results: dict) -> tuple[str, dict[str, float]]:
    """The score with the best worst-pair AUROC over every model and OOD set."""
    everywhere = [
        s for s in SCORES if all(s in row for r in results.values() for row in r["auroc"].values())
    ]
    worst = {
        s: min(row[s] for r in results.values() for row in r["auroc"].values()) for s in everywhere
    }
    return max(worst, key=worst.get), worst


def markdown(results: dict, default: str, worst: dict[str, float], command: str) -> str:
    lines = [
        "# OOD benchmark: shipped checkpoints against scikit-learn peers",
        "",
        f"Produced by `{command}`. AUROC, OOD = positive class; every score is higher = "
        "more OOD. Peers are fitted on the model's training images (raw pixels / 255).",
        "",
    ]
    for name, r in results.items():
        lines += [
            f"## `{name}` model",
            "",
            f"Calibrated on `{r['calibration_data']}`; in-distribution test images "
            f"`{r['in_distribution']}`; IWAE k = {r['iwae_k']}; "
            f"{r['seconds']:.0f} s in all.",
            "",
        ]
        oods = list(r["auroc"])
        lines += ["| score | " + " | ".join(oods) + " | worst |", "|---" * (len(oods) + 2) + "|"]
        for s in (*(s for s in SCORES if s in r["auroc"][oods[0]]), *PEERS):
            vals = [r["auroc"][o][s] for o in oods]
            lines.append(
                f"| `{s}` | " + " | ".join(f"{v:.4f}" for v in vals) + f" | {min(vals):.4f} |"
            )
        best_peer = [max(r["auroc"][o][p] for p in PEERS) for o in oods]
        lines.append(
            "| **best peer** | "
            + " | ".join(f"{v:.4f}" for v in best_peer)
            + f" | {min(best_peer):.4f} |"
        )
        nats = r["spread_nats"]
        lines += [
            "",
            f"Spread on in-distribution test images: std of E(x) "
            f"{nats['energy_std_nats']:.2f} nats against std of -log p_vae(x) "
            f"{nats['nll_std_nats']:.2f} nats.",
            "",
        ]
        lines += [
            "Calibrated thresholds (target FPR from calibration.json), FPR achieved on "
            "the held-out half of the calibration images, and the share of each OOD set "
            "accepted (missed) at that threshold:",
            "",
            "| score | threshold | FPR achieved [95% CI] | "
            + " | ".join(f"missed {o}" for o in oods)
            + " |",
            "|---" * (len(oods) + 3) + "|",
        ]
        for s, c in r["calibration"].items():
            missed = " | ".join(f"{r['ood_accepted_at_threshold'][o][s]:.4f}" for o in oods)
            lines.append(
                f"| `{s}` | {c['threshold']:.4f} | {c['achieved_fpr']:.4f} "
                f"[{c['ci'][0]:.4f}, {c['ci'][1]:.4f}] | {missed} |"
            )
        lines.append("")
    lines += [
        "## Default decision score",
        "",
        "Worst-pair AUROC over both models and every OOD set: "
        + ", ".join(f"`{s}` {v:.4f}" for s, v in sorted(worst.items(), key=lambda x: -x[1]))
        + f". Best: **`{default}`**.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default="../shared/datasets")
    parser.add_argument("--checkpoints", default="checkpoints")
    parser.add_argument("--models", nargs="+", default=["fashion-mnist", "mnist"])
    parser.add_argument("--n", type=int, default=2000, help="images per evaluation set")
    parser.add_argument(
        "--n-calibration",
        type=int,
        default=5000,
        help="first test images used to calibrate (at most 5000)",
    )
    parser.add_argument("--iwae-k", type=int, default=8)
    parser.add_argument("--target-fpr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="docs")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="reuse a model's docs/ood-benchmark-NAME.json if present",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    results = {}
    for name in args.models:  # one result file per model, so models can run in parallel
        path = Path(args.out) / f"ood-benchmark-{name}.json"
        if not (args.reuse and path.is_file()):
            atomic_write_json(path, run_model(name, args))
        results[name] = json.loads(path.read_text())
    default, worst = choose_default(results)
    for name in args.models:  # the shipped calibrations decide with the chosen score
        directory = Path(args.checkpoints) / name
        _, info = load_checkpoint(directory)
        calibration = load_calibration(directory, weights_sha256=info.weights_sha256)
        calibration.default_score = default
        save_calibration(directory, calibration)
        write_report_markdown(directory, calibration)
    out = Path(args.out)
    atomic_write_json(
        out / "ood-benchmark-results.json",
        {"results": results, "default": default, "worst_pair_auroc": worst},
    )
    atomic_write_bytes(
        out / "ood-benchmarks.md", markdown(results, default, worst, this_command()).encode()
    )
    log.info(
        "default decision score by this benchmark: %s (worst-pair AUROC %.4f)",
        default,
        worst[default],
    )
    print(json.dumps({m: r["auroc"] for m, r in results.items()}, indent=1))


if __name__ == "__main__":
    main()
