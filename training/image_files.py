"""Image files on disk: directories or tar archives of encoded images (PNG, JPEG, ...);
the limits and the error shared with the array files (:mod:`training.array_files`).

Each ``load_*`` function here and there reads one kind of file and returns ``uint8`` images shaped
``(N, H, W, C)`` with ``C`` in ``{1, 3}``, or raises :class:`DataError` naming the file and
the problem. :mod:`training.data` picks the loader from a data source spec and adds
slicing and the conversion to the model's shape.

Nothing here trusts a size a file states: each is checked against
:data:`MAX_SOURCE_BYTES` or :data:`MAX_IMAGE_FILE_BYTES` before memory is allocated for it,
so a decompression bomb or a lying header is refused in one line, not met as a
``MemoryError``. Images are decoded as the service decodes uploads (``service/imaging.py``):
the EXIF orientation applied, alpha and palette transparency composited on black, 16-bit
values scaled to 8 bits, the first frame of an animation, so that a model is calibrated on
the same pixels it is later asked to score.
"""

from __future__ import annotations

import io
import lzma
import os
import tarfile
import warnings
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from model.pixels import to_gray_or_rgb

__all__ = [
    "DataError",
    "IMAGE_FORMATS",
    "IMAGE_SUFFIXES",
    "MAX_IMAGE_FILE_BYTES",
    "MAX_SOURCE_BYTES",
    "gib",
    "load_directory",
    "load_tar",
]

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

IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")
"""The Pillow formats of :data:`IMAGE_SUFFIXES`, the only ones decoded (as the service's):
a file named ``.png`` that holds, say, EPS must not start Ghostscript."""

MAX_SOURCE_BYTES = 2 << 30
"""Most bytes one data source may expand to (2 GiB): its decoded pixels, and also the
decompressed content of a gzip IDX file or a tar archive. CIFAR-10's 50000 training images
take 150 MB; a source past this is a decompression bomb or a mistake, refused before the
memory is taken rather than met as a ``MemoryError`` or the kernel's OOM killer."""

MAX_IMAGE_FILE_BYTES = 1 << 30
"""Largest image file read into memory (1 GiB): an uncompressed image at Pillow's pixel
limit (89 million pixels) at 8 bytes a pixel (16-bit RGBA) takes 716 MB."""

_READ_CHUNK = 1 << 16  # small image files: below malloc's mmap threshold


class DataError(ValueError):
    """A data source is missing or malformed; the message names the file and the problem."""


def gib(size: int) -> str:
    """A byte count for a message, e.g. ``2 GiB``."""
    return f"{size / (1 << 30):g} GiB"


# ---------------------------------------------------------------------------
# Image files: directories and tar archives
# ---------------------------------------------------------------------------


def _is_hidden(parts: Iterable[str]) -> bool:
    """Whether a relative path, as its parts, is hidden (a part starts with ``.``)."""
    return any(part.startswith(".") for part in parts)


def _has_image_suffix(name: str) -> bool:
    """Whether a file name ends in one of :data:`IMAGE_SUFFIXES`, in any case."""
    return name.lower().endswith(IMAGE_SUFFIXES)


def load_directory(root: Path) -> np.ndarray:
    """Decode every image file below ``root`` in sorted path order."""
    files = _directory_images(root)
    if not files:
        raise DataError(f"{root}: directory contains no image files ({' '.join(IMAGE_SUFFIXES)})")
    return _stack_images(_file_bytes(files))


def _directory_images(root: Path) -> list[Path]:
    """The visible image files below ``root``, in sorted relative-path order.

    Symbolic links are followed wherever they lead, to files and to folders (a folder of
    links is a common way to name a subset of a dataset); a folder reached twice, through
    a link or a loop, is read once; a broken link with an image's name is refused.
    """
    try:
        entries = sorted(_visible_entries(root), key=lambda path: path.relative_to(root).as_posix())
    except (OSError, RuntimeError) as exc:
        raise DataError(f"{root}: cannot list the directory: {exc}") from exc
    return [path for path in entries if _is_image_file(path, root)]


def _visible_entries(root: Path) -> list[Path]:
    """Every entry below ``root`` outside hidden folders, following links to folders but
    entering each real folder once. A folder that cannot be listed raises (``Path.rglob``
    would skip it quietly, and its images with it)."""

    def fail(exc: OSError) -> None:
        raise exc

    entries: list[Path] = []
    seen = {os.path.realpath(root)}
    for folder, dirnames, filenames in os.walk(root, onerror=fail, followlinks=True):
        kept = []
        for name in sorted(dirnames):  # the first of two ways to a folder, in sorted order
            real = os.path.realpath(os.path.join(folder, name))
            if not name.startswith(".") and real not in seen:
                seen.add(real)
                kept.append(name)
        dirnames[:] = kept
        entries += [Path(folder, name) for name in filenames]
    return entries


def _is_image_file(path: Path, root: Path) -> bool:
    """Whether a directory entry is a visible image file to read, refusing image-named
    entries that are broken links or not files (a FIFO would hang)."""
    parts = path.relative_to(root).parts
    if _is_hidden(parts) or not _has_image_suffix(parts[-1]):
        return False
    if path.is_symlink() and not path.exists():
        raise DataError(f"{path}: broken symbolic link to {os.readlink(path)}")
    if path.is_dir():
        return False
    if not path.is_file():
        raise DataError(f"{path}: not a regular file (a FIFO, socket or device), not an image")
    return True


def _file_bytes(files: list[Path]) -> Iterator[tuple[str, bytes]]:
    """Yield ``(label, content)`` for each file, labelled by its path."""
    for path in files:
        try:
            size = path.stat().st_size
            if size > MAX_IMAGE_FILE_BYTES:
                raise DataError(_too_large_file(str(path), size))
            content = path.read_bytes()
        except OSError as exc:
            raise DataError(f"{path}: cannot read the file: {exc}") from exc
        yield str(path), content


def _too_large_file(label: str, size: int) -> str:
    """The message for an image file larger than :data:`MAX_IMAGE_FILE_BYTES`."""
    return (
        f"{label}: {size:,} bytes, more than the {gib(MAX_IMAGE_FILE_BYTES)} an image file may take"
    )


def load_tar(path: Path) -> np.ndarray:
    """Decode the image members of a tar archive in memory, in sorted member-name order.

    Nothing is extracted: member names only sort and filter, so a name with ``..`` or a
    leading ``/`` cannot write anywhere, and links resolve to other members of the same
    archive, never to files on disk.
    """
    archive = _open_tar(path)
    try:
        with archive:
            members = _tar_image_members(path, archive)
            if not members:
                raise DataError(
                    f"{path}: archive contains no image files ({' '.join(IMAGE_SUFFIXES)})"
                )
            return _stack_images(_tar_member_bytes(path, archive, members))
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise DataError(f"{path}: cannot read the archive: {exc}") from exc


def _open_tar(path: Path) -> tarfile.TarFile:
    """Open a plain or compressed tar archive, refusing anything else in one line
    (tarfile's own message lists every method it tried, over five lines)."""
    try:
        return tarfile.open(path, "r:*")
    except tarfile.ReadError as exc:
        raise DataError(
            f"{path}: not a readable tar archive (plain, or compressed with gzip, bzip2 or "
            "xz): another format, or truncated or corrupt"
        ) from exc
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise DataError(f"{path}: cannot read the archive: {exc}") from exc


def _tar_image_members(path: Path, archive: tarfile.TarFile) -> list[tuple[str, tarfile.TarInfo]]:
    """The image members of an archive as ``(normalised name, member)``, sorted by name.

    Members are read one header at a time, so the archive's total content is checked
    against :data:`MAX_SOURCE_BYTES` before a huge member is decompressed (even only to
    skip it).
    """
    total = 0
    chosen: dict[str, tarfile.TarInfo] = {}
    for member in archive:
        total += member.size
        if total > MAX_SOURCE_BYTES:
            raise DataError(
                f"{path}: the archive's content passes {gib(MAX_SOURCE_BYTES)} uncompressed "
                f"at member {member.name}; that is the most a data source may hold"
            )
        name = _tar_image_name(path, member)
        if name is None:
            continue
        if name in chosen:
            raise DataError(
                f"{member.name} in {path}: a second member named {name}; which one is meant "
                "is ambiguous (tar x keeps the last, a listing shows both)"
            )
        chosen[name] = member
    _check_tar_end(path, archive)
    return sorted(chosen.items())


def _check_tar_end(path: Path, archive: tarfile.TarFile) -> None:
    """Refuse an archive whose member list did not end at an end-of-archive marker.

    tarfile ends the list quietly at the first header it cannot parse, or at the end of
    the data, so a truncated or corrupt archive would yield its first images as if they
    were all. ``archive.offset`` is where tarfile stopped: there must be a zero block.
    """
    archive.fileobj.seek(archive.offset)
    if archive.fileobj.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
        raise DataError(
            f"{path}: truncated or corrupt: no valid member header or end-of-archive marker "
            f"at byte {archive.offset:,} (after {len(archive.getmembers())} members); an archive "
            "written without its end marker looks the same: `tar -cf` writes one"
        )


def _tar_image_name(path: Path, member: tarfile.TarInfo) -> str | None:
    """The normalised name of an image member (``./a/b.png`` -> ``a/b.png``), or None
    for a member that is no image: another suffix, hidden, or a directory.

    Raises
    ------
    DataError
        For an image name with ``..`` (it would leave the archive if extracted), an image
        member that is not a file or link (a device, a FIFO), or one too large to read.
    """
    parts = [part for part in member.name.split("/") if part not in ("", ".")]
    if not parts or not _has_image_suffix(parts[-1]) or member.isdir():
        return None
    label = f"{member.name} in {path}"
    if ".." in parts:
        raise DataError(f"{label}: the member name leads outside the archive ('..')")
    if _is_hidden(parts):
        return None
    if not (member.isfile() or member.islnk() or member.issym()):
        raise DataError(f"{label}: not a regular file (a device or FIFO), not an image")
    if member.size > MAX_IMAGE_FILE_BYTES:
        raise DataError(_too_large_file(label, member.size))
    return "/".join(parts)


def _tar_member_bytes(
    path: Path, archive: tarfile.TarFile, members: list[tuple[str, tarfile.TarInfo]]
) -> Iterator[tuple[str, bytes]]:
    """Yield ``(label, content)`` for each tar member, labelled by member and archive.

    A hard or symbolic link reads the member it names, looked up in the archive itself
    (tarfile never follows a link onto the disk); reading stops past
    :data:`MAX_IMAGE_FILE_BYTES`, as a link's own header does not tell its target's size.
    """
    for _, member in members:
        label = f"{member.name} in {path}"
        try:
            handle = archive.extractfile(member)
        except KeyError as exc:
            raise DataError(
                f"{label}: a link to {member.linkname}, which is not in the archive before it"
            ) from exc
        except RecursionError as exc:  # tarfile follows symbolic links by recursing
            raise DataError(
                f"{label}: a link to {member.linkname} in a chain of links that loops"
            ) from exc
        if handle is None:
            raise DataError(f"{label}: a link to {member.linkname}, which is not a file")
        with handle:
            yield label, _read_capped(label, handle)


def _read_capped(label: str, handle: IO[bytes]) -> bytes:
    """Read a member in small chunks, stopping past :data:`MAX_IMAGE_FILE_BYTES` (one
    ``read(limit)`` would allocate the whole limit up front, for every image)."""
    chunks: list[bytes] = []
    size = 0
    while chunk := handle.read(_READ_CHUNK):
        size += len(chunk)
        if size > MAX_IMAGE_FILE_BYTES:
            raise DataError(_too_large_file(label, size))
        chunks.append(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------


def _stack_images(items: Iterable[tuple[str, bytes]]) -> np.ndarray:
    """Decode encoded images of one size into ``(N, H, W, C)``.

    The result is grayscale (``C == 1``) when every image is grayscale, else RGB, with
    grayscale images repeated over three channels. The decoded pixels, and the stacked
    result, may take at most :data:`MAX_SOURCE_BYTES`.
    """
    arrays: list[np.ndarray] = []
    first_label = ""
    total = 0
    for label, content in items:
        array = _decode_image(label, content)
        if arrays and array.shape[:2] != arrays[0].shape[:2]:
            raise DataError(
                f"{label}: image size {_size_text(array)} differs from {_size_text(arrays[0])} "
                f"of {first_label}; all images of a source must have the same size"
            )
        if not arrays:
            first_label = label
        total += array.nbytes
        _check_decoded_size(label, total)
        arrays.append(array)
    if all(array.ndim == 2 for array in arrays):
        return np.stack(arrays)[..., np.newaxis]
    _check_decoded_size(first_label, arrays[0].shape[0] * arrays[0].shape[1] * 3 * len(arrays))
    return np.stack([_as_rgb(array) for array in arrays])


def _check_decoded_size(label: str, total: int) -> None:
    """Refuse a source whose decoded images pass :data:`MAX_SOURCE_BYTES`."""
    if total > MAX_SOURCE_BYTES:
        raise DataError(
            f"{label}: the images decoded up to here take {total:,} bytes, more than the "
            f"{gib(MAX_SOURCE_BYTES)} a data source may hold"
        )


def _size_text(array: np.ndarray) -> str:
    """Format an image array's size as Pillow does, ``WIDTHxHEIGHT``."""
    return f"{array.shape[1]}x{array.shape[0]}"


def _as_rgb(array: np.ndarray) -> np.ndarray:
    """Return an ``(H, W, 3)`` view of an ``(H, W)`` or ``(H, W, 3)`` image."""
    if array.ndim == 3:
        return array
    return np.repeat(array[..., np.newaxis], 3, axis=-1)


def _decode_image(label: str, content: bytes) -> np.ndarray:
    """Decode one image (its first frame) to ``uint8`` ``(H, W)`` if grayscale, else
    ``(H, W, 3)``, upright by its EXIF orientation."""
    if not content:
        raise DataError(f"{label}: the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():  # Pillow only warns up to twice its pixel limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(content), formats=IMAGE_FORMATS)
        with opened as image:
            _check_pixels(label, image)
            image.load()
            return _image_to_array(_upright(image))
    except DataError:
        raise
    except UnidentifiedImageError as exc:  # its message names only an in-memory buffer
        raise DataError(
            f"{label}: cannot decode the image: not a {_format_list()} image Pillow can read"
        ) from exc
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise DataError(f"{label}: cannot decode the image: {exc}") from exc


def _upright(image: Image.Image) -> Image.Image:
    """The image turned by its EXIF orientation, as a viewer (and the service) shows it;
    the image itself when it has none (a copy per image would slow large sets)."""
    if image.getexif().get(ExifTags.Base.Orientation, 1) == 1:
        return image
    return ImageOps.exif_transpose(image) or image


def _format_list() -> str:
    """``PNG, JPEG, ... or TIFF`` for messages."""
    return f"{', '.join(IMAGE_FORMATS[:-1])} or {IMAGE_FORMATS[-1]}"


def _check_pixels(label: str, image: Image.Image) -> None:
    """Refuse, before decoding, an image over Pillow's decompression-bomb pixel limit
    (where Pillow itself would only print a warning and decode it)."""
    limit = Image.MAX_IMAGE_PIXELS
    width, height = image.size
    if limit is not None and width * height > limit:
        raise DataError(
            f"{label}: the image is {width}x{height} = {width * height:,} pixels, more than "
            f"Pillow's limit of {limit:,} (a decompression bomb?)"
        )


def _image_to_array(image: Image.Image) -> np.ndarray:
    """A decoded Pillow image as ``uint8`` gray ``(H, W)`` or RGB ``(H, W, 3)``, converted
    as the service converts an upload (:func:`model.pixels.to_gray_or_rgb`)."""
    converted, _ = to_gray_or_rgb(image)
    array = np.asarray(converted, dtype=np.uint8)
    if image.mode in ("LA", "La"):  # gray composited on black: one channel of three equal
        return array[..., 0]
    return array
