"""Array files on disk: IDX files (MNIST's format) and ``.npz`` archives of ``uint8`` arrays.

Each ``load_*`` function returns ``uint8`` images shaped ``(N, H, W, C)`` with ``C`` in
``{1, 3}``, or raises :class:`~training.image_files.DataError` naming the file and the
problem. Neither trusts a size its file states: the header is checked against
:data:`~training.image_files.MAX_SOURCE_BYTES` before memory is allocated for the data.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, BinaryIO

import numpy as np

import training.image_files as image_files
from training.image_files import DataError, gib

__all__ = ["load_idx", "load_npz"]

_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801
_IDX_HEADER_SIZE = 4 + 3 * 4
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members, an empty zip
_NPY_MAGIC = b"\x93NUMPY"
_NPY_VERSIONS = ((1, 0), (2, 0), (3, 0))
_LARGE_READ_CHUNK = 1 << 22  # IDX pixel data: tens of megabytes
_IDX_TYPE_NAMES = {
    0x08: "unsigned byte",
    0x09: "signed byte",
    0x0B: "short",
    0x0C: "int",
    0x0D: "float",
    0x0E: "double",
}


# ---------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _open_maybe_gzip(path: Path) -> Iterator[BinaryIO]:
    """Open a file for reading, through gzip when it starts with the gzip magic bytes
    (the content decides, not the name)."""
    with path.open("rb") as raw:
        compressed = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        if not compressed:
            yield raw
            return
        with gzip.GzipFile(fileobj=raw) as unzipped:
            yield unzipped  # type: ignore[misc]


def _read_at_most(stream: BinaryIO, size: int) -> bytearray:
    """Read up to ``size`` bytes (fewer only at the end of the stream) into a writable
    buffer, so that numpy can use it without a copy. It grows with what is read: a header
    that lies about the size allocates nothing for it."""
    buffer = bytearray()
    while len(buffer) < size:
        chunk = stream.read(min(size - len(buffer), _LARGE_READ_CHUNK))
        if not chunk:
            break
        buffer += chunk
    return buffer


def load_idx(path: Path) -> np.ndarray:
    """Parse an IDX file of unsigned-byte images into ``(N, H, W, 1)``.

    The header is read and checked first, and no more pixel data than it declares (plus
    one byte, to notice trailing data) is read or decompressed: a gzip bomb or a header
    declaring billions of images costs nothing.
    """
    try:
        with _open_maybe_gzip(path) as stream:
            count, height, width = _parse_idx_header(path, stream.read(_IDX_HEADER_SIZE))
            expected = count * height * width
            if expected > image_files.MAX_SOURCE_BYTES:
                raise DataError(
                    f"{path}: the header says {count} images of {height}x{width} ({expected:,} "
                    f"bytes), more than the {gib(image_files.MAX_SOURCE_BYTES)} a data source "
                    "may hold"
                )
            pixels = _read_at_most(stream, expected + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read the file: {exc}") from exc
    found = len(pixels)
    if found != expected:
        problem = "truncated" if found < expected else "has trailing bytes"
        holds = f"{found} bytes" if found < expected else "more"
        raise DataError(
            f"{path}: {problem}: the header says {count} images of {height}x{width} "
            f"({expected} bytes) but the file holds {holds} of pixel data"
        )
    return np.frombuffer(pixels, dtype=np.uint8).reshape(count, height, width, 1)


def _parse_idx_header(path: Path, header: bytes) -> tuple[int, int, int]:
    """``(count, height, width)`` of an IDX images header, refusing anything else."""
    if len(header) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(header)} bytes)")
    magic = int.from_bytes(header[:4], "big")
    if magic == _IDX_LABELS_MAGIC:
        raise DataError(f"{path}: this IDX file holds 1-D labels, not images")
    if magic != _IDX_IMAGES_MAGIC:
        raise DataError(f"{path}: {_describe_idx_magic(magic)}; expected 0x00000803")
    if len(header) < _IDX_HEADER_SIZE:
        raise DataError(f"{path}: truncated IDX header ({len(header)} of {_IDX_HEADER_SIZE} bytes)")
    count, height, width = (int.from_bytes(header[i : i + 4], "big") for i in (4, 8, 12))
    return count, height, width


def _describe_idx_magic(magic: int) -> str:
    """Explain an unexpected IDX magic number."""
    if magic >> 16 != 0:
        return f"not an IDX file (magic number 0x{magic:08x})"
    type_name = _IDX_TYPE_NAMES.get((magic >> 8) & 0xFF, "an unknown type")
    ndim = magic & 0xFF
    return f"this IDX file holds {ndim}-D data of {type_name} (magic number 0x{magic:08x})"


# ---------------------------------------------------------------------------
# NPZ files
# ---------------------------------------------------------------------------


def load_npz(path: Path) -> np.ndarray:
    """Load the image array of a ``.npz`` file as ``(N, H, W, C)``.

    Read with :mod:`zipfile` rather than ``np.load``: the array's header (dtype, shape) is
    checked before any of its data is read, so neither an object array (never unpickled)
    nor a header declaring terabytes allocates anything, and members that are not ``.npy``
    arrays are never handed back as raw bytes.
    """
    _check_npz_magic(path)
    try:
        with zipfile.ZipFile(path) as archive:
            arrays = {
                name.removesuffix(".npy"): name
                for name in archive.namelist()
                if name.endswith(".npy")
            }
            key = _pick_npz_key(path, list(arrays))
            where = f"{path} (array '{key}')"
            with archive.open(arrays[key]) as member:
                shape, dtype = _npy_header(where, member)
            _check_npz_array(where, shape, dtype)
            with archive.open(arrays[key]) as member:
                array = np.lib.format.read_array(member, allow_pickle=False)
    except DataError:
        raise
    except (
        OSError,
        ValueError,
        EOFError,
        zlib.error,
        zipfile.BadZipFile,
        NotImplementedError,  # a compression method zipfile lacks
        RuntimeError,  # an encrypted member
    ) as exc:
        raise DataError(f"{path}: cannot read the .npz file: {exc}") from exc
    return array if array.ndim == 4 else array[..., np.newaxis]


def _check_npz_magic(path: Path) -> None:
    """Refuse a file that is not a zip archive with a message saying what it is, where
    numpy's would call any such file pickled data."""
    try:
        with path.open("rb") as handle:
            start = handle.read(len(_NPY_MAGIC))
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file: {exc}") from exc
    if start.startswith(_ZIP_MAGICS):
        return
    if not start:
        raise DataError(f"{path}: the file is empty (0 bytes)")
    if start == _NPY_MAGIC:
        raise DataError(
            f"{path}: this is a .npy file (one array), not a .npz archive; "
            "save the images with numpy.savez(PATH, images=array)"
        )
    raise DataError(f"{path}: not a .npz file (a zip archive of .npy arrays)")


def _npy_header(where: str, member: IO[bytes]) -> tuple[tuple[int, ...], np.dtype]:
    """``(shape, dtype)`` from the header of a ``.npy`` member, without reading its data."""
    version = np.lib.format.read_magic(member)
    if version not in _NPY_VERSIONS:
        raise DataError(f"{where}: unsupported .npy format version {version}")
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
    return shape, dtype


def _check_npz_array(where: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Refuse an array that is not uint8 ``(N, H, W)`` or ``(N, H, W, C)`` with ``C`` in
    ``{1, 3}``, or that is larger than a data source may be."""
    if dtype != np.uint8:
        raise DataError(f"{where}: dtype must be uint8, got {dtype}")
    if not (len(shape) == 3 or (len(shape) == 4 and shape[-1] in (1, 3))):
        raise DataError(
            f"{where}: shape must be (N, H, W) or (N, H, W, C) with C in {{1, 3}}, got {shape}"
        )
    size = math.prod(shape)
    if size > image_files.MAX_SOURCE_BYTES:
        raise DataError(
            f"{where}: the array {shape} takes {size:,} bytes, more than the "
            f"{gib(image_files.MAX_SOURCE_BYTES)} a data source may hold"
        )


def _pick_npz_key(path: Path, keys: list[str]) -> str:
    """Choose ``images`` or the only array of a ``.npz`` file."""
    if "images" in keys:
        return "images"
    if len(keys) == 1:
        return keys[0]
    if not keys:
        raise DataError(f"{path}: the .npz file holds no arrays (.npy members)")
    raise DataError(
        f"{path}: the .npz file holds several arrays ({', '.join(keys)}) and none is named 'images'"
    )
