"""Upload decoding: bytes -> uint8 (C, H, W) in the model's shape, or a precise error.

Steps, in order:

1. identify the format from the content (not the file name) among PNG, JPEG, WebP, BMP,
   GIF and TIFF; another image format or a non-image media type -> 415;
2. read the header only and check ``width * height`` against the pixel limit -> 413,
   before any pixel is decoded (decompression bombs);
3. decode the first frame (GIF, TIFF, animated PNG and WebP; the report counts the
   frames, or says the frames after the first are unreadable), apply the EXIF
   orientation; truncated or corrupt data -> 422;
4. convert the mode to the model's channels: alpha and palette transparency are
   composited on black, 16-bit and float data scaled to 8 bits, CMYK/YCbCr/LAB/HSV
   converted to RGB, RGB to grayscale with ITU-R 601-2 luma (as ``training.data`` does);
5. resize bilinearly to the model's side (as ``training.data`` does), or reject -> 422.

:class:`ImageInfo` reports what was found and what was done.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from model.pixels import to_gray_or_rgb
from service.errors import ProblemError
from service.settings import ResizePolicy

SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
_GENERIC_MEDIA_TYPES = ("", "application/octet-stream", "binary/octet-stream")
# Formats whose frame count means reading every frame (PNG and WebP state it in the header)
_SCANNED_FRAME_FORMATS = ("GIF", "TIFF")


@dataclass(frozen=True)
class ImageInfo:
    """What an upload was and what decoding did to it."""

    format: str
    original_width: int
    original_height: int
    original_mode: str
    converted: bool  # mode changed to reach the model's channels
    resized: bool
    exif_transposed: bool
    frames: int | None  # frames in the file, None if those after the first are unreadable
    conversion: str  # human-readable steps, e.g. "RGBA composited on black -> L"


def unsupported_media(detail: str) -> ProblemError:
    return ProblemError(415, "unsupported-media-type", detail)


def undecodable(detail: str) -> ProblemError:
    return ProblemError(422, "undecodable-image", detail)


def image_too_large(detail: str) -> ProblemError:
    return ProblemError(413, "image-too-large", detail)


def _supported_list() -> str:
    return ", ".join(SUPPORTED_FORMATS)


def _open(data: bytes, content_type: str | None) -> Image.Image:
    """Identify the format from the content and read the header (no pixels yet)."""
    media = (content_type or "").split(";")[0].strip().lower()
    if not data:
        raise undecodable("the file is empty (0 bytes)")
    try:
        return Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise image_too_large(
            f"the image is a decompression bomb by Pillow's limit: {exc}"
        ) from exc
    except UnidentifiedImageError:
        pass
    except Exception as exc:  # a known format whose header is cut or corrupt (e.g. OSError)
        raise undecodable(f"the image header is truncated or corrupt: {exc}") from exc
    other = _identify_any(data)
    if other is not None:
        raise unsupported_media(
            f"image format {other} is not supported; send one of {_supported_list()}"
        )
    if media and media not in _GENERIC_MEDIA_TYPES and not media.startswith("image/"):
        raise unsupported_media(
            f"media type {media} is not an image; send one of {_supported_list()}"
        )
    raise undecodable(
        f"cannot identify the data as an image ({len(data)} bytes); expected one of "
        f"{_supported_list()}"
    )


def _identify_any(data: bytes) -> str | None:
    """Format name if Pillow knows the data under some other format, else None."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return str(img.format)
    except Exception:  # anything Pillow cannot identify at all
        return None


def _check_pixels(img: Image.Image, max_pixels: int) -> None:
    width, height = img.size
    if width * height > max_pixels:
        raise image_too_large(
            f"the image is {width}x{height} = {width * height} pixels, above the limit of "
            f"{max_pixels} pixels (VAEBM_MAX_IMAGE_PIXELS); send a smaller image"
        )
    if width == 0 or height == 0:
        raise undecodable(f"the image has no pixels ({width}x{height})")


def _count_frames(img: Image.Image, data: bytes) -> int | None:
    """Frames in the file; None when the frames after the first cannot be read.

    GIF and TIFF are counted by reading every frame, on a handle of their own: a corrupt
    later frame must neither fail the first one nor leave ``img`` in a half-seeked state.
    """
    if img.format not in _SCANNED_FRAME_FORMATS:
        return int(getattr(img, "n_frames", 1))
    try:
        with Image.open(io.BytesIO(data), formats=(img.format,)) as other:
            return int(getattr(other, "n_frames", 1))
    except Exception:  # any parsing error in a later frame (IndexError, struct.error, ...)
        return None


def _frames_step(frames: int | None) -> list[str]:
    if frames is None:
        return ["first frame (the frames after it are unreadable)"]
    return [f"first of {frames} frames"] if frames > 1 else []


def _load_first_frame(img: Image.Image) -> tuple[Image.Image, bool]:
    """Decode the first frame and apply the EXIF orientation; returns (image, transposed)."""
    try:
        img.seek(0)
        img.load()
        orientation = img.getexif().get(0x0112, 1)
        transposed = ImageOps.exif_transpose(img)
    except Exception as exc:  # decoders raise many types on corrupt data (OverflowError, ...)
        raise undecodable(f"the {img.format} data is truncated or corrupt: {exc}") from exc
    return (transposed if transposed is not None else img), orientation not in (1, None)


def _to_channels(img: Image.Image, channels: int) -> tuple[Image.Image, list[str]]:
    target = "L" if channels == 1 else "RGB"
    if img.mode == target:
        return img, []
    return img.convert(target), [f"{img.mode} -> {target}"]


def decode_image(
    data: bytes,
    *,
    channels: int,
    size: int,
    max_pixels: int,
    resize: ResizePolicy,
    content_type: str | None = None,
) -> tuple[np.ndarray, ImageInfo]:
    """Decode an upload into the model's input.

    Parameters
    ----------
    data : bytes
        The uploaded file.
    channels : int
        1 (grayscale) or 3 (RGB), the model's channels.
    size : int
        The model's square side in pixels.
    max_pixels : int
        Largest ``width * height`` accepted, checked before decoding.
    resize : ResizePolicy
        Resize other sizes bilinearly, or reject them.
    content_type : str, optional
        The media type the client declared; only used to tell non-images (415) from
        broken images (422) when the content is not recognised.

    Returns
    -------
    image : numpy.ndarray, uint8, shape (channels, size, size)
    info : ImageInfo

    Raises
    ------
    ProblemError
        415 for an unsupported format or media type, 413 above the pixel limit, 422 for
        undecodable data or (with ``resize=reject``) the wrong size.
    """
    img = _open(data, content_type)
    fmt = str(img.format)
    original_mode = img.mode
    original_width, original_height = img.size  # as stored, before the EXIF orientation
    _check_pixels(img, max_pixels)
    frames = _count_frames(img, data)
    img, transposed = _load_first_frame(img)
    img, mode_steps = to_gray_or_rgb(img)
    steps = _frames_step(frames) + mode_steps
    if channels == 1:  # fewer channels first, then resize one plane (training.data's order)
        img, more = _to_channels(img, channels)
        img, resized = _resize(img, size, resize)
    else:
        img, resized = _resize(img, size, resize)
        img, more = _to_channels(img, channels)
    steps += more
    if resized:
        steps.append(f"resized to {size}x{size} (bilinear)")
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[np.newaxis] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # (C, H, W)
    info = ImageInfo(
        format=fmt,
        original_width=original_width,
        original_height=original_height,
        original_mode=original_mode,
        converted=original_mode != ("L" if channels == 1 else "RGB"),
        resized=resized,
        exif_transposed=transposed,
        frames=frames,
        conversion="; ".join(steps) if steps else "none",
    )
    return np.ascontiguousarray(arr), info


def _resize(img: Image.Image, size: int, policy: ResizePolicy) -> tuple[Image.Image, bool]:
    if img.size == (size, size):
        return img, False
    if policy is ResizePolicy.REJECT:
        width, height = img.size
        raise ProblemError(
            422,
            "wrong-image-size",
            f"the image is {width}x{height}, the model takes {size}x{size}; resize it before "
            "uploading (this server runs with VAEBM_RESIZE=reject)",
        )
    return img.resize((size, size), Image.Resampling.BILINEAR), True
