"""Every OOD score, defined once: name, unit, meaning, and how it is computed.

Convention: for every score, **higher = more out-of-distribution**. Scores in
``_bpd`` are bits per dimension of 8-bit data (D = C * H * W values per image);
``energy`` is in the energy network's own units (nats of unnormalised density).

Scores are reproducible per image: the posterior draws of the importance-weighted
bound are seeded by (seed, the image's bytes), so an image gets the same scores
whatever batch it arrives in (up to float32 rounding of the batch's sums).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from model.complexity import lossless_bits_per_dim
from model.likelihood import to_unit_range
from model.typicality import TYPICALITY_SCORE
from model.vaebm import VAEBM


@dataclass(frozen=True)
class ScoreSpec:
    name: str
    unit: str
    description: str
    direction: str = "higher = more out-of-distribution"
    # True for a score fitted on the calibration images (it needs calibration.json's
    # reference); False for a pure function of the model and the image (compute_scores).
    fitted: bool = False


SCORES: dict[str, ScoreSpec] = {
    s.name: s
    for s in (
        ScoreSpec("elbo_bpd", "bits/dim", "-ELBO of the VAE (negative log-likelihood bound)."),
        ScoreSpec(
            "iwae_bpd", "bits/dim", "-log p_vae(x) from the k-sample importance-weighted bound."
        ),
        ScoreSpec("energy", "energy units (nats)", "E(x) of the energy network alone."),
        ScoreSpec(
            "vaebm_bpd",
            "bits/dim",
            "VAEBM unnormalised negative log density (E(x) - log p_vae(x)) / (D ln 2), "
            "log p_vae from the IWAE bound; log Z dropped (it does not change rankings).",
        ),
        ScoreSpec(
            "complexity_bpd",
            "bits/dim",
            "vaebm_bpd minus the PNG-compressed length of the image (Serra et al. 2020): "
            "likelihood corrected for how simple the image is.",
        ),
        ScoreSpec(
            "elbo_complexity_bpd",
            "bits/dim",
            "elbo_bpd minus the PNG-compressed length of the image: the ELBO twin of "
            "complexity_bpd.",
        ),
        ScoreSpec(
            "complexity_webp_bpd",
            "bits/dim",
            "vaebm_bpd minus the WebP-lossless length of the image: complexity_bpd with a "
            "stronger compressor (Serra et al. found better compressors give better scores).",
        ),
        ScoreSpec(
            "elbo_complexity_webp_bpd",
            "bits/dim",
            "elbo_bpd minus the WebP-lossless length of the image: the ELBO twin of "
            "complexity_webp_bpd.",
        ),
        ScoreSpec(
            "iwae_gap_bpd",
            "bits/dim",
            "elbo_bpd - iwae_bpd: how badly the encoder fits the image (an amortisation "
            "gap that grows off the training distribution).",
        ),
        ScoreSpec(
            TYPICALITY_SCORE,
            "nats",
            "-log density of the image's (elbo_bpd, elbo_complexity_webp_bpd, energy) under a "
            "Gaussian KDE of the calibration images' (model.typicality): flags images whose "
            "likelihood, code length and energy do not fit together, in either direction.",
            fitted=True,
        ),
        ScoreSpec(
            "vaebm_typicality_nats",
            "nats",
            "-log density of the image's (vaebm_bpd, complexity_webp_bpd) under a Gaussian "
            "KDE of the calibration images' (model.typicality): typicality_nats on the VAEBM "
            "density and its complexity correction instead of the ELBO and the energy apart.",
            fitted=True,
        ),
    )
}
SCORE_NAMES = tuple(SCORES)
MODEL_SCORE_NAMES = tuple(n for n, s in SCORES.items() if not s.fitted)  # compute_scores' keys
DEFAULT_SCORE = "vaebm_typicality_nats"  # chosen by benchmarks/ood_benchmark.py, see docs/
# The benchmark's best score that needs no fitting: the default where a calibration set
# cannot fit the fitted ones (too few images, or statistics that do not vary).
UNFITTED_DEFAULT_SCORE = "elbo_complexity_webp_bpd"


def image_seeds(images: np.ndarray, seed: int) -> list[int]:
    """One 63-bit seed per image from (seed, image bytes)."""
    seeds = []
    for img in images:
        digest = hashlib.sha256(seed.to_bytes(8, "little", signed=True) + img.tobytes()).digest()
        seeds.append(int.from_bytes(digest[:8], "little") >> 1)
    return seeds


def posterior_noise(model: VAEBM, images: np.ndarray, k: int, seed: int) -> list[torch.Tensor]:
    """Standard-normal draws for k posterior samples per image, seeded per image.

    Returns one tensor (k * B, C, H, W) per latent group, row ``j * B + b`` for
    sample j of image b, as ``VAE.iwae_and_elbo`` expects.
    """
    per_image = []
    for s in image_seeds(images, seed):
        generator = torch.Generator().manual_seed(s)
        per_image.append(
            [torch.randn(k, *shape, generator=generator) for shape in model.vae.latent_shapes]
        )
    groups = []
    for g in range(len(model.vae.latent_shapes)):
        stacked = torch.stack([draws[g] for draws in per_image], dim=1)  # (k, B, C, H, W)
        groups.append(stacked.flatten(0, 1).to(model.device))
    return groups


@torch.no_grad()
def compute_scores(
    model: VAEBM, images: np.ndarray, *, iwae_k: int = 16, seed: int = 0
) -> dict[str, np.ndarray]:
    """All scores of SCORES but the fitted ones (MODEL_SCORE_NAMES) for a batch of images.

    Parameters
    ----------
    model : VAEBM in eval mode, on any device.
    images : uint8 array (B, C, H, W) matching the model's image shape.
    iwae_k : importance samples for ``iwae_bpd`` (and the k-sample ELBO average).
    seed : base seed of the per-image posterior draws.

    Returns
    -------
    dict name -> float64 array (B,), every score higher = more out-of-distribution.
    """
    expected = model.vae.image_shape
    if images.ndim != 4 or tuple(images.shape[1:]) != expected or images.dtype != np.uint8:
        raise ValueError(
            f"images must be uint8 (B, {expected[0]}, {expected[1]}, {expected[2]}), "
            f"got {images.dtype} {tuple(images.shape)}"
        )
    if len(images) == 0:
        raise ValueError("images is empty: nothing to score")
    if isinstance(iwae_k, bool) or not isinstance(iwae_k, int | np.integer) or iwae_k < 1:
        raise ValueError(f"iwae_k must be an integer >= 1, got {iwae_k!r}")
    if not -(2**63) <= seed < 2**63:  # image_seeds packs it into 8 signed bytes
        raise ValueError(f"seed must be in [-2**63, 2**63), got {seed}")
    # torch.from_numpy refuses negative strides (a flipped view) and warns on read-only
    # arrays (np.asarray of a PIL image): copy only in those cases.
    images = np.require(images, requirements=("C", "W"))
    x = to_unit_range(torch.from_numpy(images).to(model.device))
    noise = posterior_noise(model, images, iwae_k, seed)
    iwae_nats, elbo_nats = model.vae.iwae_and_elbo(x, iwae_k, noise)
    energy = model.energy(x)
    to_bpd = 1.0 / (model.vae.config.num_dims * math.log(2.0))
    elbo_bpd = (-elbo_nats * to_bpd).double().cpu().numpy()
    iwae_bpd = (-iwae_nats * to_bpd).double().cpu().numpy()
    energy_np = energy.double().cpu().numpy()
    vaebm_bpd = iwae_bpd + energy_np * to_bpd
    png_bpd = lossless_bits_per_dim(images, "png")
    webp_bpd = lossless_bits_per_dim(images, "webp")
    return {
        "elbo_bpd": elbo_bpd,
        "iwae_bpd": iwae_bpd,
        "energy": energy_np,
        "vaebm_bpd": vaebm_bpd,
        "complexity_bpd": vaebm_bpd - png_bpd,
        "elbo_complexity_bpd": elbo_bpd - png_bpd,
        "complexity_webp_bpd": vaebm_bpd - webp_bpd,
        "elbo_complexity_webp_bpd": elbo_bpd - webp_bpd,
        "iwae_gap_bpd": elbo_bpd - iwae_bpd,
    }


def chunk_sizes(n: int, largest: int) -> list[int]:
    """Split n images into forward passes of a few fixed sizes.

    Full chunks of ``largest``, then the remainder as distinct powers of two (its
    binary digits): 45 with largest 32 gives [32, 8, 4, 1]. Nothing is padded, and
    every pass has one of at most ``log2(largest) + 2`` shapes, so a long-running
    process reuses the same few tensor sizes instead of fragmenting its heap with
    every batch size it ever saw, and peak memory is that of one ``largest`` chunk.
    """
    if largest < 1:
        raise ValueError(f"largest must be >= 1, got {largest}")
    sizes = [largest] * (n // largest)
    rest = n % largest
    while rest:
        step = 1 << (rest.bit_length() - 1)
        sizes.append(step)
        rest -= step
    return sizes


def forward_pass_sizes(largest: int) -> list[int]:
    """Every size ``chunk_sizes`` can produce for this ``largest``, ascending."""
    return sorted({largest, *(1 << i for i in range(largest.bit_length()) if 1 << i < largest)})


def score_in_batches(
    model: VAEBM,
    images: np.ndarray,
    *,
    batch_size: int = 256,
    iwae_k: int = 16,
    seed: int = 0,
    progress: Callable[[int], object] | None = None,
) -> dict[str, np.ndarray]:
    """compute_scores over any number of images, in forward passes of ``chunk_sizes``.

    Scores do not depend on how images are grouped (posterior draws are seeded per
    image). ``progress``: optional callable receiving the number of images done per
    pass (e.g. a tqdm ``update``), so that command-line tools can show a bar.
    """
    if len(images) == 0:
        raise ValueError("images is empty: nothing to score")
    parts: dict[str, list[np.ndarray]] = {name: [] for name in MODEL_SCORE_NAMES}
    start = 0
    for size in chunk_sizes(len(images), batch_size):
        chunk = compute_scores(model, images[start : start + size], iwae_k=iwae_k, seed=seed)
        for name, values in chunk.items():
            parts[name].append(values)
        start += size
        if progress is not None:
            progress(size)
    return {name: np.concatenate(values) for name, values in parts.items()}
