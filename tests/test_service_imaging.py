"""Tests for service.imaging: formats, modes, EXIF, limits and the error classes."""

from __future__ import annotations

import contextlib
import io
import struct

import numpy as np
import pytest
from PIL import Image

from model.grid import encode_png, image_grid
from service.errors import ProblemError
from service.imaging import decode_image
from service.settings import ResizePolicy

SUPPORTED = "PNG, JPEG, WEBP, BMP, GIF, TIFF"


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def decode(data: bytes, *, channels: int = 1, size: int = 28, **kwargs: object):
    options = {"max_pixels": 1_000_000, "resize": ResizePolicy.RESIZE, **kwargs}
    return decode_image(data, channels=channels, size=size, **options)


def problem_of(data: bytes, **kwargs: object) -> ProblemError:
    with pytest.raises(ProblemError) as info:
        decode(data, **kwargs)
    return info.value


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"])
def test_every_supported_format_decodes(fmt: str) -> None:
    img = Image.new("RGB", (28, 28), (0, 255, 0))
    array, info = decode(encode(img, fmt))
    assert array.shape == (1, 28, 28) and array.dtype == np.uint8
    assert info.format == fmt
    expected_mode = "P" if fmt == "GIF" else "RGB"  # GIF is always a palette
    assert (info.original_width, info.original_height, info.original_mode) == (
        28,
        28,
        expected_mode,
    )
    # Green through ITU-R 601-2 luma is 150 (lossy formats land close to it).
    assert abs(int(array[0, 14, 14]) - 150) <= 3


def test_gray_png_of_the_model_size_is_untouched() -> None:
    pixels = np.arange(28 * 28, dtype=np.uint32).reshape(28, 28) % 256
    array, info = decode(encode(Image.fromarray(pixels.astype(np.uint8)), "PNG"))
    np.testing.assert_array_equal(array[0], pixels)
    assert not info.converted and not info.resized and info.conversion == "none"


def test_resize_and_conversion_are_reported() -> None:
    array, info = decode(encode(Image.new("RGB", (40, 30), (255, 0, 0)), "PNG"))
    assert array.shape == (1, 28, 28)
    assert (info.original_width, info.original_height) == (40, 30)
    assert info.converted and info.resized
    assert info.conversion == "RGB -> L; resized to 28x28 (bilinear)"


def test_rgb_model_gets_three_channels_from_gray() -> None:
    array, info = decode(encode(Image.new("L", (32, 32), 77), "PNG"), channels=3, size=32)
    assert array.shape == (3, 32, 32)
    assert np.all(array == 77) and info.conversion == "L -> RGB"


def test_gif_first_frame_is_used() -> None:
    frames = [Image.new("L", (28, 28), 10), Image.new("L", (28, 28), 250)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    array, info = decode(data)
    assert abs(int(array.mean()) - 10) <= 1
    assert info.frames == 2 and info.conversion.startswith("first of 2 frames; ")


def test_single_frame_is_not_reported_as_a_selection() -> None:
    _, info = decode(encode(Image.new("L", (28, 28), 10), "GIF"))
    assert info.frames == 1 and "frames" not in info.conversion


def multi_frame(fmt: str, frames: list[Image.Image]) -> bytes:
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:])


def test_a_gif_whose_later_frames_are_cut_off_is_scored_on_its_first() -> None:
    levels = (20, 120, 240)
    data = multi_frame("GIF", [Image.new("L", (28, 28), v) for v in levels])
    outcomes = []
    for cut in range(len(data) - 1, 0, -1):
        try:
            outcomes.append(decode(data[:cut]))
        except ProblemError:
            continue
    unreadable = [(array, info) for array, info in outcomes if info.frames is None]
    assert unreadable, "some cut should leave the first frame readable and the count not"
    for array, info in unreadable:
        assert np.all(array == levels[0])
        assert info.conversion.startswith("first frame (the frames after it are unreadable)")


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's notes on corrupt metadata
@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "PNG", "WEBP"])
def test_cut_or_corrupted_multi_frame_files_give_a_result_or_a_problem(fmt: str) -> None:
    # Pillow raises IndexError, TypeError, KeyError, struct.error, OverflowError... on
    # such files; each must become a ProblemError (4xx), never escape as a 500.
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)) for _ in range(4)]
    data = np.frombuffer(multi_frame(fmt, frames), dtype=np.uint8)
    step = max(1, len(data) // 200)
    variants = [data[:cut].tobytes() for cut in range(20, len(data), step)]
    for _ in range(len(variants)):
        flips = (rng.random(len(data)) < 0.01) * rng.integers(1, 255, len(data))
        variants.append((data ^ flips.astype(np.uint8)).tobytes())
    for variant in variants:
        with contextlib.suppress(ProblemError):
            decode(variant, max_pixels=10_000_000)


def test_a_tiff_whose_strip_offset_overflows_is_a_problem() -> None:
    # Found by fuzzing: the StripOffsets entry retyped to LONG8 (8 bytes, so read from the
    # offset its 4-byte field names) with a top byte of 0x81; seeking there raises
    # OverflowError inside Pillow's decoder, which used to escape as a 500.
    data = bytearray(encode(Image.new("L", (28, 28), 50), "TIFF"))
    entry = data.find(b"\x11\x01\x04\x00\x01\x00\x00\x00")  # tag 273, LONG, count 1
    data[entry + 2] = 16  # LONG8
    (where,) = struct.unpack_from("<I", data, entry + 8)
    data[where + 7] = 0x81
    exc = problem_of(bytes(data))
    assert (exc.status, exc.type) == (422, "urn:vaebm-ood:problem:undecodable-image")
    assert exc.detail.startswith("the TIFF data is truncated or corrupt")


def test_exif_orientation_is_applied() -> None:
    img = Image.new("L", (40, 20), 0)
    img.paste(255, (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    array, info = decode(encode(img, "JPEG", exif=exif), resize=ResizePolicy.RESIZE, size=28)
    assert info.exif_transposed
    assert (info.original_width, info.original_height) == (40, 20)
    # Displayed upright, the white half is on top.
    assert array[0, :10].mean() > 200 and array[0, -10:].mean() < 50


def test_sixteen_bit_png_is_scaled_to_eight_bits() -> None:
    pixels = np.full((28, 28), 65535, dtype=np.uint16)
    pixels[:14] = 257 * 100
    array, info = decode(encode(Image.fromarray(pixels), "PNG"))
    assert info.original_mode.startswith("I")
    assert array[0, 0, 0] == 100 and array[0, -1, -1] == 255
    assert "16-bit scaled to 8 bits" in info.conversion


def test_float_tiff_in_unit_range_is_scaled() -> None:
    pixels = np.full((28, 28), 0.5, dtype=np.float32)
    array, info = decode(encode(Image.fromarray(pixels, mode="F"), "TIFF"))
    assert info.original_mode == "F" and array[0, 0, 0] == 128


def test_palette_transparency_is_composited_on_black() -> None:
    img = Image.new("P", (28, 28), 1)
    img.putpalette([255, 255, 255] * 2 + [0, 0, 0] * 254)
    img.info["transparency"] = 1
    array, info = decode(encode(img, "PNG", transparency=1))
    assert np.all(array == 0)
    assert info.conversion.startswith("P composited on black -> RGB")


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_alpha_is_composited_on_black(mode: str) -> None:
    color = (200, 0) if mode == "LA" else (200, 200, 200, 0)
    img = Image.new(mode, (28, 28), color)
    img.putpixel((0, 0), (200, 255) if mode == "LA" else (200, 200, 200, 255))
    array, _ = decode(encode(img, "PNG"))
    assert array[0, 0, 0] == 200 and array[0, 5, 5] == 0


def test_cmyk_jpeg_is_converted() -> None:
    array, info = decode(encode(Image.new("CMYK", (28, 28), (0, 0, 0, 0)), "JPEG"))
    assert info.original_mode == "CMYK" and info.converted
    assert array.mean() > 240  # no ink = white


def test_one_bit_bmp() -> None:
    array, info = decode(encode(Image.new("1", (28, 28), 1), "BMP"))
    assert info.original_mode == "1" and np.all(array == 255)


def test_reject_policy_names_the_sizes() -> None:
    exc = problem_of(encode(Image.new("L", (30, 20)), "PNG"), resize=ResizePolicy.REJECT)
    assert exc.status == 422
    assert exc.detail == (
        "the image is 30x20, the model takes 28x28; resize it before uploading "
        "(this server runs with VAEBM_RESIZE=reject)"
    )


def test_pixel_limit_is_checked_before_decoding() -> None:
    # A PNG cut right after its first data chunk header: it announces a large image but
    # holds no pixels, so passing this check without decoding proves the order.
    header = encode(Image.new("L", (3000, 2000)), "PNG")[:41]
    exc = problem_of(header, max_pixels=1_000_000)
    assert exc.status == 413
    assert exc.type == "urn:vaebm-ood:problem:image-too-large"
    assert exc.detail == (
        "the image is 3000x2000 = 6000000 pixels, above the limit of 1000000 pixels "
        "(VAEBM_MAX_IMAGE_PIXELS); send a smaller image"
    )


def test_truncated_png_is_422() -> None:
    data = encode(
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), np.uint8)), "PNG"
    )
    exc = problem_of(data[: len(data) // 2])
    assert exc.status == 422 and exc.type == "urn:vaebm-ood:problem:undecodable-image"
    assert exc.detail.startswith("the PNG data is truncated or corrupt: ")


def test_unknown_bytes_are_422() -> None:
    exc = problem_of(b"\x00\x01garbage" * 10)
    assert exc.status == 422
    assert (
        exc.detail
        == f"cannot identify the data as an image (90 bytes); expected one of {SUPPORTED}"
    )


def test_empty_file_is_422() -> None:
    exc = problem_of(b"")
    assert (exc.status, exc.detail) == (422, "the file is empty (0 bytes)")


def test_text_media_type_is_415() -> None:
    exc = problem_of(b"hello, world", content_type="text/plain; charset=utf-8")
    assert exc.status == 415
    assert exc.detail == f"media type text/plain is not an image; send one of {SUPPORTED}"


def test_other_image_format_is_415() -> None:
    exc = problem_of(encode(Image.new("RGB", (16, 16)), "ICO"))
    assert exc.status == 415
    assert exc.detail == f"image format ICO is not supported; send one of {SUPPORTED}"


def test_grid_and_png_round_trip() -> None:
    images = np.stack([np.full((1, 4, 4), v, np.uint8) for v in (10, 20, 30)])
    grid = image_grid(images, padding=1)
    assert grid.shape == (1, 2 * 4 + 3, 2 * 4 + 3)
    assert grid[0, 1, 1] == 10 and grid[0, 1, 6] == 20 and grid[0, 6, 1] == 30
    decoded = np.asarray(Image.open(io.BytesIO(encode_png(grid))))
    np.testing.assert_array_equal(decoded, grid[0])
