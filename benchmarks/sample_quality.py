"""Sample quality: FID of VAEBM samples against VAE-only samples, and sampling cost.

Inception weights cannot be downloaded here, so the Fréchet distance is computed
in the feature space of a small classifier trained by this script on the same
training set (penultimate layer, 128 features). Both sample sets come from the
same checkpoint and the same prior noise; VAEBM adds Langevin steps.

    python benchmarks/sample_quality.py --shared ../shared/datasets --n 10000

Writes docs/sample-quality.json and sample grids docs/samples-<model>-{vae,vaebm}.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scipy import linalg
from timing import wall_seconds
from torch import nn
from tqdm import tqdm

from model.checkpoint import atomic_write_bytes, atomic_write_json, load_checkpoint
from model.device import select_device
from model.grid import encode_png, image_grid
from model.likelihood import to_uint8, to_unit_range
from model.vaebm import VAEBM
from training.data import ImageShape, load_dataset


class FeatureNet(nn.Module):
    """A small CNN classifier; its 128-d penultimate layer is the FID feature space."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.LazyLinear(128),
            nn.ReLU(),
        )
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def read_labels(path: str) -> np.ndarray:
    import gzip

    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read()[8:], dtype=np.uint8).astype(np.int64)


def train_classifier(images: np.ndarray, labels: np.ndarray, device, epochs: int, seed: int):
    torch.manual_seed(seed)
    net = FeatureNet(images.shape[1]).to(device)
    x_all = torch.from_numpy(images)
    y_all = torch.from_numpy(labels)
    net(to_unit_range(x_all[:2].to(device)))  # materialise the lazy layer
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(epochs):
        for idx in tqdm(torch.randperm(len(x_all)).split(128), desc="classifier"):
            loss = nn.functional.cross_entropy(
                net(to_unit_range(x_all[idx].to(device))), y_all[idx].to(device)
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@torch.no_grad()
def features(net: FeatureNet, images: np.ndarray, device) -> np.ndarray:
    parts = [
        net.features(to_unit_range(torch.from_numpy(c).to(device))).cpu().numpy()
        for c in np.array_split(images, max(len(images) // 500, 1))
    ]
    return np.concatenate(parts).astype(np.float64)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) between two feature sets."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root.real))


def draw(model: VAEBM, n: int, steps: int, step_size: float, batch: int, seed: int) -> np.ndarray:
    out = []
    for i, start in enumerate(tqdm(range(0, n, batch), desc=f"sampling steps={steps}")):
        x = model.sample(min(batch, n - start), steps=steps, step_size=step_size, seed=seed + i)
        out.append(to_uint8(x).cpu().numpy())
    return np.concatenate(out)


def save_grid(path: Path, images: np.ndarray) -> None:
    atomic_write_bytes(path, encode_png(image_grid(images)))


def timed(fn, repeats: int = 3) -> float:
    """Median wall time of ``fn()`` over a few repeats, seconds."""
    return float(np.median(wall_seconds(fn, repeats)))


def run_model(name: str, args, device) -> dict:
    model, info = load_checkpoint(Path(args.checkpoints) / name, device)
    shape = ImageShape(*model.vae.image_shape[:2])
    root = Path(args.shared) / name
    train = load_dataset(f"{root}/train-images-idx3-ubyte.gz", shape)
    labels = read_labels(f"{root}/train-labels-idx1-ubyte.gz")
    test = load_dataset(f"{root}/t10k-images-idx3-ubyte.gz@0:{args.n}", shape)
    net = train_classifier(train, labels, device, args.classifier_epochs, args.seed)
    step_size = args.step_size or info.training.get("ebm", {}).get("step_size", 1e-4)
    vae_samples = draw(model, args.n, 0, step_size, args.batch, args.seed)
    vaebm_samples = draw(model, args.n, args.steps, step_size, args.batch, args.seed)
    save_grid(Path(args.out) / f"samples-{name}-vae.png", vae_samples[:64])
    save_grid(Path(args.out) / f"samples-{name}-vaebm.png", vaebm_samples[:64])
    f_test = features(net, test, device)
    fid_vae = frechet_distance(features(net, vae_samples, device), f_test)
    fid_vaebm = frechet_distance(features(net, vaebm_samples, device), f_test)
    fid_train = frechet_distance(features(net, train[: args.n], device), f_test)
    cost_vae = timed(lambda: model.sample(64, steps=0, seed=0))
    cost_vaebm = timed(lambda: model.sample(64, steps=16, step_size=step_size, seed=0))
    return {
        "weights_sha256": info.weights_sha256,
        "n": args.n,
        "langevin_steps": args.steps,
        "step_size": step_size,
        "fid_vae": fid_vae,
        "fid_vaebm": fid_vaebm,
        "fid_ratio_vaebm_over_vae": fid_vaebm / fid_vae,
        "fid_train_vs_test_floor": fid_train,
        "seconds_64_samples_vae_only": cost_vae,
        "seconds_64_samples_vaebm_16_steps": cost_vaebm,
        "sampling_cost_ratio": cost_vaebm / cost_vae,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default="../shared/datasets")
    parser.add_argument("--checkpoints", default="checkpoints")
    parser.add_argument("--models", nargs="+", default=["fashion-mnist", "mnist"])
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument(
        "--step-size",
        type=float,
        default=0.0,
        help="Langevin step size; 0 = the one the EBM was trained with",
    )
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--classifier-epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="docs")
    args = parser.parse_args()
    device = select_device(args.device)
    results = {name: run_model(name, args, device) for name in args.models}
    atomic_write_json(Path(args.out) / "sample-quality.json", results)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
