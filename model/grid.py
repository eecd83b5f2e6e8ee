"""Tile a batch of images into one grid picture (pure numpy)."""

from __future__ import annotations

import math

import numpy as np


def image_grid(images: np.ndarray, *, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile uint8 images (N, C, H, W) into one (rows*(H+pad)+pad, ..., C) array.

    The border and empty cells are black; ``columns`` defaults to about sqrt(N).
    Returns (H', W') for one channel, (H', W', 3) for three, ready for Pillow.
    """
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty (N, C, H, W) array, got {images.shape}")
    n, c, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad, c), dtype=images.dtype)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = np.transpose(img, (1, 2, 0))
    return grid[..., 0] if c == 1 else grid
