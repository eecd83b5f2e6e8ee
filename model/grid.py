"""Tile a batch of images into one grid picture, and encode images as PNG."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image


def image_grid(images: np.ndarray, *, padding: int = 2) -> np.ndarray:
    """Tile uint8 images (N, C, H, W) into one (C, H', W') grid, near square, black gaps."""
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty (N, C, H, W) array, got {images.shape}")
    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros(
        (c, rows * h + (rows + 1) * padding, cols * w + (cols + 1) * padding), dtype=images.dtype
    )
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + k * (w + padding)
        grid[:, top : top + h, left : left + w] = img
    return grid


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8 (C, H, W) image, C in {1, 3}; deterministic."""
    pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()
