"""Image files on disk: IDX files, ``.npz`` arrays, and directories or tar archives of
encoded images (PNG, JPEG, ...).

Each ``load_*`` function reads one kind of file and returns ``uint8`` images shaped
``(N, H, W, C)`` with ``C`` in ``{1, 3}``, or raises :class:`DataError` naming the file and
the problem. :mod:`training.data` picks the loader from a data source spec and adds
slicing and the conversion to the model's shape.
"""

from __future__ import annotations

import gzip
import io
import tarfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["DataError", "IMAGE_SUFFIXES", "load_directory", "load_idx", "load_npz", "load_tar"]

IMAGE_SUFFIXES: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
)
"""File-name suffixes (lower case) read as images from directories and archives."""

_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801
_IDX_TYPE_NAMES = {
    0x08: "unsigned byte",
    0x09: "signed byte",
    0x0B: "short",
    0x0C: "int",
    0x0D: "float",
    0x0E: "double",
}
_GRAY_MODES = frozenset({"1", "L", "LA", "La"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


class DataError(ValueError):
    """A data source is missing or malformed; the message names the file and the problem."""


# ---------------------------------------------------------------------------
# IDX and NPZ files
# ---------------------------------------------------------------------------


def _read_maybe_gzip(path: Path) -> bytes:
    """Read a file, decompressing it when it starts with the gzip magic bytes."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read the file: {exc}") from exc
    return raw


def load_idx(path: Path) -> np.ndarray:
    """Parse an IDX file of unsigned-byte images into ``(N, H, W, 1)``."""
    data = _read_maybe_gzip(path)
    if len(data) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    magic = int.from_bytes(data[:4], "big")
    if magic == _IDX_LABELS_MAGIC:
        raise DataError(f"{path}: this IDX file holds 1-D labels, not images")
    if magic != _IDX_IMAGES_MAGIC:
        raise DataError(f"{path}: {_describe_idx_magic(magic)}; expected 0x00000803")
    header_size = 4 + 3 * 4
    if len(data) < header_size:
        raise DataError(f"{path}: truncated IDX header ({len(data)} of {header_size} bytes)")
    count, height, width = (int.from_bytes(data[i : i + 4], "big") for i in (4, 8, 12))
    expected = count * height * width
    found = len(data) - header_size
    if found != expected:
        problem = "truncated" if found < expected else "has trailing bytes"
        raise DataError(
            f"{path}: {problem}: the header says {count} images of {height}x{width} "
            f"({expected} bytes) but the file holds {found} bytes of pixel data"
        )
    pixels = np.frombuffer(data, dtype=np.uint8, offset=header_size)
    return pixels.reshape(count, height, width, 1).copy()


def _describe_idx_magic(magic: int) -> str:
    """Explain an unexpected IDX magic number."""
    if magic >> 16 != 0:
        return f"not an IDX file (magic number 0x{magic:08x})"
    type_name = _IDX_TYPE_NAMES.get((magic >> 8) & 0xFF, "an unknown type")
    ndim = magic & 0xFF
    return f"this IDX file holds {ndim}-D data of {type_name} (magic number 0x{magic:08x})"


def load_npz(path: Path) -> np.ndarray:
    """Load the image array of a ``.npz`` file as ``(N, H, W, C)``."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.files)
            key = _pick_npz_key(path, keys)
            array = archive[key]
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: cannot read the .npz file: {exc}") from exc
    where = f"{path} (array '{key}')"
    if array.dtype != np.uint8:
        raise DataError(f"{where}: dtype must be uint8, got {array.dtype}")
    if array.ndim == 3:
        return array[..., np.newaxis]
    if array.ndim == 4 and array.shape[-1] in (1, 3):
        return array
    raise DataError(
        f"{where}: shape must be (N, H, W) or (N, H, W, C) with C in {{1, 3}}, got {array.shape}"
    )


def _pick_npz_key(path: Path, keys: list[str]) -> str:
    """Choose ``images`` or the only array of a ``.npz`` file."""
    if "images" in keys:
        return "images"
    if len(keys) == 1:
        return keys[0]
    if not keys:
        raise DataError(f"{path}: the .npz file holds no arrays")
    raise DataError(
        f"{path}: the .npz file holds several arrays ({', '.join(keys)}) and none is named 'images'"
    )


# ---------------------------------------------------------------------------
# Image files: directories and tar archives
# ---------------------------------------------------------------------------


def _is_image_name(relative: str) -> bool:
    """Whether a relative path names a visible image file."""
    parts = relative.split("/")
    if any(part.startswith(".") for part in parts if part):
        return False
    return parts[-1].lower().endswith(IMAGE_SUFFIXES)


def load_directory(root: Path) -> np.ndarray:
    """Decode every image file below ``root`` in sorted path order."""
    files = sorted(
        (path for path in root.rglob("*") if path.is_file()),
        key=lambda path: path.relative_to(root).as_posix(),
    )
    files = [path for path in files if _is_image_name(path.relative_to(root).as_posix())]
    if not files:
        raise DataError(f"{root}: directory contains no image files ({' '.join(IMAGE_SUFFIXES)})")
    return _stack_images(_file_bytes(files))


def _file_bytes(files: list[Path]) -> Iterator[tuple[str, bytes]]:
    """Yield ``(label, content)`` for each file, labelled by its path."""
    for path in files:
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise DataError(f"{path}: cannot read the file: {exc}") from exc
        yield str(path), content


def load_tar(path: Path) -> np.ndarray:
    """Decode the image members of a tar archive in memory, in sorted member-name order."""
    try:
        with tarfile.open(path, "r:*") as archive:
            members = sorted(
                (m for m in archive.getmembers() if m.isfile() and _is_image_name(m.name)),
                key=lambda member: member.name,
            )
            if not members:
                raise DataError(
                    f"{path}: archive contains no image files ({' '.join(IMAGE_SUFFIXES)})"
                )
            return _stack_images(_tar_member_bytes(path, archive, members))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read the archive: {exc}") from exc


def _tar_member_bytes(
    path: Path, archive: tarfile.TarFile, members: list[tarfile.TarInfo]
) -> Iterator[tuple[str, bytes]]:
    """Yield ``(label, content)`` for each tar member, labelled by member and archive."""
    for member in members:
        handle = archive.extractfile(member)
        if handle is None:  # pragma: no cover - isfile() members always have content
            raise DataError(f"{member.name} in {path}: cannot read the member")
        with handle:
            yield f"{member.name} in {path}", handle.read()


def _stack_images(items: Iterable[tuple[str, bytes]]) -> np.ndarray:
    """Decode encoded images of one size into ``(N, H, W, C)``.

    The result is grayscale (``C == 1``) when every image is grayscale, else RGB, with
    grayscale images repeated over three channels.
    """
    arrays: list[np.ndarray] = []
    first_label = ""
    for label, content in items:
        array = _decode_image(label, content)
        if arrays and array.shape[:2] != arrays[0].shape[:2]:
            raise DataError(
                f"{label}: image size {_size_text(array)} differs from {_size_text(arrays[0])} "
                f"of {first_label}; all images of a source must have the same size"
            )
        if not arrays:
            first_label = label
        arrays.append(array)
    if all(array.ndim == 2 for array in arrays):
        return np.stack(arrays)[..., np.newaxis]
    return np.stack([_as_rgb(array) for array in arrays])


def _size_text(array: np.ndarray) -> str:
    """Format an image array's size as Pillow does, ``WIDTHxHEIGHT``."""
    return f"{array.shape[1]}x{array.shape[0]}"


def _as_rgb(array: np.ndarray) -> np.ndarray:
    """Return an ``(H, W, 3)`` view of an ``(H, W)`` or ``(H, W, 3)`` image."""
    if array.ndim == 3:
        return array
    return np.repeat(array[..., np.newaxis], 3, axis=-1)


def _decode_image(label: str, content: bytes) -> np.ndarray:
    """Decode one image to ``uint8`` ``(H, W)`` if grayscale, else ``(H, W, 3)``."""
    try:
        with Image.open(io.BytesIO(content)) as image:
            image.load()
            return _image_to_array(label, image)
    except DataError:
        raise
    except UnidentifiedImageError as exc:  # its message names only an in-memory buffer
        raise DataError(f"{label}: cannot decode the image: not an image Pillow can read") from exc
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise DataError(f"{label}: cannot decode the image: {exc}") from exc


def _image_to_array(label: str, image: Image.Image) -> np.ndarray:
    """Convert a decoded Pillow image to ``uint8`` gray ``(H, W)`` or RGB ``(H, W, 3)``."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        # Pillow's convert("L") clips 16-bit values; keep the high byte instead.
        return (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
    if mode in _GRAY_MODES:
        return np.asarray(image.convert("L"), dtype=np.uint8)
    if mode in ("I", "F"):
        raise DataError(f"{label}: unsupported {mode!r} image mode (32-bit pixels)")
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
