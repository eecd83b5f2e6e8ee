"""Decoded images to 8-bit gray or RGB pixels: one rule for the service's uploads
(``service/imaging.py``) and the offline data sources (``training/image_files.py``), so
that a model is trained and calibrated on the pixels it is later asked to score.

Alpha and palette transparency are composited on black (dropping the alpha would show
whatever colour transparent pixels happen to store), 16-bit and 32-bit integer data are
clipped to 0..65535 and scaled by 1/257 (onto 0..255), float data from [0, 1] or
[0, 255], and every other mode (CMYK, YCbCr, LAB, HSV, palette) is converted to RGB.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

ALPHA_MODES = ("LA", "La", "RGBA", "RGBa", "PA")
SIXTEEN_BIT_MAX = 65535.0


def _to_eight_bit(img: Image.Image) -> tuple[Image.Image, str]:
    """Integer (``I;16*``, ``I``) and float (``F``) modes to 8-bit L, with a note of how."""
    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr.astype(np.float64)
        top = 1.0 if np.nanmax(arr, initial=0.0) <= 1.0 else 255.0
        scaled = np.nan_to_num(arr, nan=0.0) * (255.0 / top)
        note = f"float scaled from [0, {top:g}] to 8 bits"
    else:  # I;16* or I (Pillow's 32-bit mode, used for 16-bit data)
        scaled = np.clip(arr.astype(np.float64), 0, SIXTEEN_BIT_MAX) / 257.0
        note = "16-bit scaled to 8 bits"
    out = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="L"), note


def _composite_on_black(img: Image.Image) -> Image.Image:
    """RGB of an image with alpha or palette transparency laid over black."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_gray_or_rgb(img: Image.Image) -> tuple[Image.Image, list[str]]:
    """The image in mode L or RGB, and the conversion's steps for a report (none when it
    already was); see the module's docstring for the rule."""
    mode = img.mode
    if mode in ("L", "RGB"):
        return img, []
    if mode == "1":
        return img.convert("L"), ["1-bit -> L"]
    if mode.startswith("I") or mode == "F":
        out, note = _to_eight_bit(img)
        return out, [note]
    if (mode == "P" and "transparency" in img.info) or mode in ALPHA_MODES:
        return _composite_on_black(img), [f"{mode} composited on black -> RGB"]
    if mode == "P":
        return img.convert("RGB"), ["palette -> RGB"]
    return img.convert("RGB"), [f"{mode} -> RGB"]
