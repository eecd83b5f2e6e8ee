"""How complex an image is: its length under a lossless codec, in bits per dimension.

The complexity scores of ``model.scores`` subtract this length from a likelihood
(Serrà et al. 2020, "Input complexity and out-of-distribution detection with
likelihood-based generative models"): a generic compressor stands in for a universal
model of images, so an image that is merely simple no longer looks typical.
"""

from __future__ import annotations

import functools
import io
from typing import Any

import numpy as np
from PIL import Image, features

# Pillow save options of the lossless codecs the complexity scores use. WebP: lossless,
# quality 100 (= most compression effort in lossless mode), libwebp's default method 4;
# method 6 saves another 2% of bytes on 28x28 images but is 34x slower (~6 ms/image).
LOSSLESS_CODECS: dict[str, dict[str, object]] = {
    "png": {"format": "PNG", "compress_level": 9},
    "webp": {"format": "WEBP", "lossless": True, "quality": 100, "method": 4},
}


def lossless_bits_per_dim(images: np.ndarray, codec: str = "png") -> np.ndarray:
    """Length of each image losslessly compressed by ``codec``, bits per dimension.

    images: uint8 (N, C, H, W) with C in {1, 3}; codec: a key of LOSSLESS_CODECS.
    Returns (N,) float64, headers included (a rough upper bound of the image's
    complexity: lower = simpler).
    """
    options = LOSSLESS_CODECS[codec]
    if not _pillow_supports(str(options["format"])):
        raise RuntimeError(
            f"this Pillow build cannot write {options['format']}, which the complexity "
            "scores need: install Pillow's wheel from PyPI (it bundles libwebp)"
        )
    return encoded_bits_per_dim(images, options)


def encoded_bits_per_dim(images: np.ndarray, save_options: dict[str, Any]) -> np.ndarray:
    """Length of each uint8 (N, C, H, W) image saved by Pillow with ``save_options``
    (format included), bits per dimension, (N,) float64."""
    out = np.empty(len(images))
    for i, img in enumerate(images):
        pixels = img[0] if img.shape[0] == 1 else np.transpose(img, (1, 2, 0))
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, **save_options)
        out[i] = 8 * buffer.tell() / img.size
    return out


@functools.cache
def _pillow_supports(image_format: str) -> bool:
    return image_format == "PNG" or bool(features.check(image_format.lower()))
