"""Corrupted training images: the negatives of the energy's outlier-exposure term.

Pure tensor functions on images ``(B, C, H, W)`` in [-1, 1]. A pixel-shuffled image keeps
its intensities and loses its structure; a blurred one keeps its layout and loses its
detail. ``vaebm train ebm --corruption-weight`` asks the energy to give each corrupted
image a higher energy than clean ones (:func:`corruption_ranking_loss`; not in the paper,
see docs/ood-analysis.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "corrupt_images",
    "corruption_ranking_loss",
    "gaussian_blur",
    "shuffle_pixels",
    "with_shuffled_negatives",
]


def shuffle_pixels(images: torch.Tensor) -> torch.Tensor:
    """Each image (B, C, H, W) with its pixel positions permuted (one permutation per
    image, shared by its channels): the intensity histogram stays, the structure goes."""
    b, c, h, w = images.shape
    order = torch.rand(b, h * w, device=images.device).argsort(dim=1)
    flat = images.reshape(b, c, h * w)
    return flat.gather(2, order.unsqueeze(1).expand(b, c, h * w)).reshape(b, c, h, w)


def gaussian_blur(images: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """Each channel of (B, C, H, W) blurred by a Gaussian of ``sigma`` pixels, one value
    or one per image (reflected borders; kernel radius 2 sigma of the largest, capped at
    the image's size less one, which reflection needs)."""
    b, c, h, w = images.shape
    sigma = torch.as_tensor(sigma, dtype=images.dtype, device=images.device).expand(b)
    radius = max(1, min(round(2 * float(sigma.max())), h - 1, w - 1))
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma[:, None]) ** 2)  # (B, K)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, dim=0)  # (B C, K)
    # Every (image, channel) plane is its own group, so each gets its own kernel.
    planes = F.pad(images.reshape(1, b * c, h, w), (radius,) * 4, mode="reflect")
    rows = F.conv2d(planes, kernel.view(b * c, 1, 1, -1), groups=b * c)
    return F.conv2d(rows, kernel.view(b * c, 1, -1, 1), groups=b * c).reshape(b, c, h, w)


def corrupt_images(
    images: torch.Tensor, blur_range: tuple[float, float] = (3.0, 3.0)
) -> torch.Tensor:
    """The first half of the batch pixel-shuffled, the rest blurred, each image by a
    sigma (pixels) drawn log-uniformly from ``blur_range``."""
    half = len(images) // 2
    low, high = blur_range
    sigma: float | torch.Tensor = low  # one fixed blur draws nothing: runs stay reproducible
    if high > low:
        u = torch.rand(len(images) - half, device=images.device)
        sigma = torch.exp(math.log(low) + (math.log(high) - math.log(low)) * u)
    return torch.cat([shuffle_pixels(images[:half]), gaussian_blur(images[half:], sigma)])


def corruption_ranking_loss(
    e_clean: torch.Tensor, e_corrupted: torch.Tensor, pairs: str = "own"
) -> torch.Tensor:
    """Mean softplus(E(clean) - E(corrupted)) over the pairs that must rank: each
    corrupted image with its own original ("own", paired by position) or with every
    clean image ("all"). Bounded: a pair stops counting once its gap is a few nats."""
    if pairs == "own":
        return F.softplus(e_clean - e_corrupted).mean()
    return F.softplus(e_clean[:, None] - e_corrupted[None, :]).mean()


def with_shuffled_negatives(x_neg: torch.Tensor, x_pos: torch.Tensor, share: float) -> torch.Tensor:
    """Replace the first ``round(share * B)`` negatives by pixel-shuffled positives."""
    n = round(share * len(x_neg))
    if n == 0:
        return x_neg
    return torch.cat([shuffle_pixels(x_pos[:n]), x_neg[n:]])
