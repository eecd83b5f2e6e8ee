"""Does an energy network help the VAE's density? One trained run, the standard pairs.

Evaluates a checkpoint (its VAE frozen, its energy from some `vaebm train ebm` run) on
1000 in-distribution test images (5000-5999) against 1000 images of each OOD set of the
OOD benchmark, IWAE k = 8, and records every score's AUROC, the energy's spread and the
training arguments under ``--name`` in docs/energy-ablations.json (other entries kept):

    python benchmarks/energy_ablation.py --run runs/cd-sample-ema --name cd-sample-ema

The question each entry answers: is ``vaebm_bpd`` at least as good as ``iwae_bpd``
(no energy) on every pair, and better where the energy learned something?
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from command_line import this_command
from ood_benchmark import sets_for

from model.checkpoint import atomic_write_json, load_checkpoint
from training.evaluate import EvaluateArgs, evaluate

REPO = Path(__file__).resolve().parent.parent
MODELS = ("fashion-mnist", "mnist")  # the shipped models the benchmark's sets are for


def compare_to_iwae(auroc: dict[str, dict[str, float]], tolerance: float) -> dict[str, str]:
    """Per OOD set: is vaebm_bpd 'better', 'equal' (within tolerance) or 'worse' than
    iwae_bpd? The energy is the only difference between the two scores."""
    verdicts = {}
    for name, per_score in auroc.items():
        delta = per_score["vaebm_bpd"] - per_score["iwae_bpd"]
        verdicts[name] = "equal" if abs(delta) <= tolerance else "better" if delta > 0 else "worse"
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="checkpoint directory of the trained run")
    parser.add_argument("--name", required=True, help="key of the entry in the JSON file")
    parser.add_argument("--shared", default="../shared/datasets")
    parser.add_argument("--iwae-k", type=int, default=8)
    parser.add_argument("--tolerance", type=float, default=0.001, help="AUROC counted as equal")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "energy-ablations.json")
    args = parser.parse_args()

    _, info = load_checkpoint(args.run)
    model_name = info.name
    if model_name not in MODELS:
        sys.exit(f"{args.run}: model {model_name!r} is not one of {MODELS}")
    # The OOD benchmark's sets, 1000 images each; test images 5000-5999.
    _, _, test_images, ood = sets_for(model_name, Path(args.shared), n=1000, n_cal=0)
    report = evaluate(
        EvaluateArgs(
            checkpoint=args.run,
            in_data=test_images,
            ood=ood,
            out=str(Path(args.run).parent / f"eval-{args.name}"),
            iwae_k=args.iwae_k,
            device=args.device,
        )
    )
    auroc = {
        name: {score: round(m["auroc"], 6) for score, m in per_score.items()}
        for name, per_score in report["metrics"].items()
    }
    entries = json.loads(args.out.read_text()) if args.out.exists() else {}
    entries[args.name] = {
        "model": model_name,
        "auroc": auroc,
        "vaebm_vs_iwae": compare_to_iwae(auroc, args.tolerance),
        "ebm_args": info.training.get("ebm", {}),
        "ebm_metrics": info.metrics.get("ebm", {}),
        "weights_sha256": info.weights_sha256,
        "command": this_command(),
    }
    atomic_write_json(args.out, entries)
    for name, per_score in auroc.items():
        print(
            f"{name:15s} iwae {per_score['iwae_bpd']:.4f}  vaebm {per_score['vaebm_bpd']:.4f}  "
            f"energy {per_score['energy']:.4f}  "
            f"complexity_webp {per_score['complexity_webp_bpd']:.4f}  "
            f"-> {entries[args.name]['vaebm_vs_iwae'][name]}"
        )
    spread = info.metrics.get("ebm", {}).get("val_energy_std", float("nan"))
    print(f"energy std on validation images: {spread:.1f} nats")


if __name__ == "__main__":
    main()
