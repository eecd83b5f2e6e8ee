"""How much of the energy does each pair want, and how much would maximum likelihood give?

The VAEBM score adds the energy to the VAE's negative log-likelihood at full weight,
``vaebm_bpd = iwae_bpd + E(x) / (D ln 2)``. Contrastive divergence with short Langevin
chains does not pin down the energy's scale: its spread on the data grows with every
iteration (docs/training.md). This measures, on the OOD benchmark's images (test images
5000-9999 against 5000 of each OOD set, IWAE k = 8, seed 0), the AUROC of
``iwae_bpd + w E(x) / (D ln 2)`` for a grid of weights w (w = 0 is ``iwae_bpd``, w = 1 is
``vaebm_bpd``), and the weight that maximum likelihood would give the energy: the s at
which the tilted model ``h_s(x) ∝ p_vae(x) exp(-s E(x))`` has the held-out data's mean
energy (the stationarity condition of the held-out log-likelihood in s), estimated by
self-normalised importance sampling from the VAE, with the effective sample size that
says how far to trust it, and in closed form for Gaussian sample energies (for when the
data's mean energy lies below nearly every VAE sample, out of importance sampling's
reach). Held-out data: the calibration half (test images 0-4999).

    python benchmarks/energy_weight.py --shared ../shared/datasets

Writes docs/energy-weight.json (one entry per checkpoint, others kept).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from command_line import this_command
from ood_benchmark import sets_for

from model.checkpoint import atomic_write_json, load_checkpoint
from model.device import select_device
from model.likelihood import to_unit_range
from model.metrics import auroc
from model.scores import score_in_batches
from training.data import ImageShape, load_dataset

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = (0.0, 0.1, 0.25, 0.5, 0.6, 0.67, 0.75, 0.9, 1.0)


def tilted_mean(energies: np.ndarray, s: float) -> tuple[float, float]:
    """Mean energy under base samples reweighted by exp(-s E), and the weights' effective
    sample size (Kish): how many equally weighted samples the estimate is worth."""
    log_w = -s * (energies - energies.min())
    w = np.exp(log_w - log_w.max())
    w /= w.sum()
    return float(w @ energies), float(1.0 / (w @ w))


def maximum_likelihood_scale(
    model_energies: np.ndarray, data_energies: np.ndarray, low: float = 1e-9, high: float = 1.0
) -> dict:
    """The s in [low, high] at which the base samples tilted by exp(-s E) match the data's
    mean energy (bisection in log s; the tilted mean falls as s grows), with the ESS there.
    ``s`` is None when no s in the range matches: the tilted mean cannot fall below the
    lowest sampled energy, so data costlier than the samples' low tail are out of reach."""
    target = float(data_energies.mean())

    def excess(s: float) -> float:
        return tilted_mean(model_energies, s)[0] - target

    if excess(low) <= 0 or excess(high) >= 0:
        return {"s": None, "ess": None}
    lo, hi = math.log(low), math.log(high)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if excess(math.exp(mid)) > 0 else (lo, mid)
    s = math.exp(0.5 * (lo + hi))
    return {"s": s, "ess": tilted_mean(model_energies, s)[1]}


def gaussian_scale(model_energies: np.ndarray, data_energies: np.ndarray) -> float:
    """The same s if the base samples' energies were Gaussian: tilting N(mu, sigma^2) by
    exp(-s E) moves its mean to mu - s sigma^2, so s = (mu - data mean) / sigma^2."""
    return float((model_energies.mean() - data_energies.mean()) / model_energies.var())


@torch.no_grad()
def vae_sample_energies(model, n: int, batch: int, seed: int) -> np.ndarray:
    """E of n samples of the VAE alone (prior, decoder sample, clipped to [-1, 1])."""
    generator = torch.Generator(device=model.device).manual_seed(seed)
    out = []
    for start in range(0, n, batch):
        noise = model.prior_noise(min(batch, n - start), generator)
        sample, _ = model.decode(noise)
        out.append(model.energy(sample.clamp(-1, 1)).cpu().numpy())
    return np.concatenate(out)


@torch.no_grad()
def data_energies(model, images: np.ndarray, batch: int) -> np.ndarray:
    """E of uint8 images (N, C, H, W), scaled to [-1, 1] as in training."""
    x = torch.from_numpy(images)
    return np.concatenate(
        [model.energy(to_unit_range(c.to(model.device))).cpu().numpy() for c in x.split(batch)]
    )


def weighted_aurocs(scores: dict[str, dict[str, np.ndarray]], bits: float) -> dict:
    """AUROC of iwae_bpd + w E / (D ln 2) per weight and OOD set; 'in' is in-distribution."""

    def combined(s: dict[str, np.ndarray], w: float) -> np.ndarray:
        return s["iwae_bpd"] + w * s["energy"] / bits

    return {
        str(w): {
            name: round(auroc(combined(scores["in"], w), combined(s, w)), 6)
            for name, s in scores.items()
            if name != "in"
        }
        for w in WEIGHTS
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", default="../shared/datasets")
    parser.add_argument("--checkpoint", default=str(REPO / "checkpoints" / "fashion-mnist"))
    parser.add_argument("--samples", type=int, default=5000, help="VAE samples for the scale")
    parser.add_argument("--iwae-k", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "energy-weight.json")
    args = parser.parse_args()

    model, info = load_checkpoint(args.checkpoint, select_device(args.device))
    shape = ImageShape(*model.vae.image_shape[:2])
    _, cal, test_images, ood = sets_for(info.name, Path(args.shared), n=5000, n_cal=5000)
    scores = {
        name: score_in_batches(
            model, load_dataset(spec, shape), batch_size=64, iwae_k=args.iwae_k, seed=args.seed
        )
        for name, spec in {"in": test_images, **ood}.items()
    }
    bits = float(np.prod(model.vae.image_shape)) * math.log(2)
    aurocs = weighted_aurocs(scores, bits)
    at_least_iwae = [
        float(w)
        for w, per_set in aurocs.items()
        if all(per_set[o] >= aurocs["0.0"][o] for o in ood)
    ]
    e_model = vae_sample_energies(model, args.samples, batch=250, seed=args.seed)
    e_data = data_energies(model, load_dataset(cal, shape), batch=250)
    scale = maximum_likelihood_scale(e_model, e_data)
    entries = json.loads(args.out.read_text()) if args.out.exists() else {}
    entries[info.name] = {
        "auroc_by_energy_weight": aurocs,
        "weights_at_least_as_good_as_iwae_on_every_pair": at_least_iwae,
        "energy_nats": {
            "held_out_data_mean_std": [
                round(float(e_data.mean()), 1),
                round(float(e_data.std()), 1),
            ],
            "vae_samples_mean_std": [
                round(float(e_model.mean()), 1),
                round(float(e_model.std()), 1),
            ],
        },
        "vae_samples_below_data_mean_energy": float((e_model < e_data.mean()).mean()),
        "maximum_likelihood_scale_importance_sampled": {
            k: None if v is None else float(f"{v:.4g}") for k, v in scale.items()
        },
        "maximum_likelihood_scale_gaussian": float(f"{gaussian_scale(e_model, e_data):.4g}"),
        "ess_at_full_weight": round(tilted_mean(e_model, 1.0)[1], 3),
        "vae_samples": args.samples,
        "weights_sha256": info.weights_sha256,
        "command": this_command(),
    }
    atomic_write_json(args.out, entries)
    print(json.dumps(entries[info.name], indent=1))


if __name__ == "__main__":
    main()
