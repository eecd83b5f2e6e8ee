"""A corpus of bad and unusual inputs for the scoring service, with the answer each must get.

Importable (``corpus(limits)`` returns :class:`BadInput` cases that
``tests/test_bad_inputs.py`` sends to the app) and runnable::

    python tests/bad_inputs.py OUTDIR [--max-upload-bytes N] [--max-batch-files N]

which writes, for every case, the exact HTTP request body (``OUTDIR/<name>.body``), the
image files on their own (``OUTDIR/files/``) and ``OUTDIR/manifest.json`` with method,
path, headers and the expected status / problem type, so that a running server can be
checked by hand, e.g.::

    curl -s -X POST http://127.0.0.1:8000/score \\
        -H 'Content-Type: multipart/form-data; boundary=vaebm-bad-inputs' \\
        --data-binary @OUTDIR/truncated-png.body

The limits given must match the server's (``VAEBM_MAX_UPLOAD_BYTES``,
``VAEBM_MAX_BATCH_FILES``); the defaults are the service's defaults. Every file is made
here from code (no downloads) and the corpus is the same on every run.
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import sys
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

BOUNDARY = "vaebm-bad-inputs"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
PROBLEM = "urn:vaebm-ood:problem:"
ABOUT_BLANK = "about:blank"
SUPPORTED = "PNG, JPEG, WEBP, BMP, GIF, TIFF"

# The service's defaults (service.settings.Settings); tests pass their own, smaller ones.
DEFAULT_MAX_UPLOAD_BYTES = 64 * 2**20
DEFAULT_MAX_BATCH_FILES = 256

# Pillow refuses to open images above 2 * Image.MAX_IMAGE_PIXELS (about 179 million
# pixels) by itself; the bomb is well above that and still a small, valid PNG.
BOMB_SIDE = 20_000  # 400 million 1-bit pixels, ~50 KB on disk
# Above the service's own default pixel limit (16 million), below Pillow's: the
# service's check before decoding is what refuses it.
LARGE_SIDE = 4_100  # 16.8 million pixels, ~3 KB on disk


@dataclass(frozen=True)
class Limits:
    """The server limits the corpus is built against."""

    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_batch_files: int = DEFAULT_MAX_BATCH_FILES


@dataclass(frozen=True)
class BadInput:
    """One request and the answer it must get.

    ``expect_type`` is the problem ``type`` of a 4xx (``None`` for a 200). For a 200 from
    ``/score``, ``expect_image`` holds fields the ``image`` report must have and
    ``expect_conversion`` text its ``conversion`` must contain.
    """

    name: str
    what: str
    path: str
    body: bytes
    content_type: str | None
    expect_status: int
    expect_type: str | None = None
    expect_detail_prefix: str | None = None
    expect_image: dict[str, object] = field(default_factory=dict)
    expect_conversion: tuple[str, ...] = ()
    files: dict[str, bytes] = field(default_factory=dict)  # file name -> bytes, for OUTDIR
    method: str = "POST"
    extra_headers: dict[str, str] = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, str]:
        content_type = {"Content-Type": self.content_type} if self.content_type else {}
        return {**content_type, **self.extra_headers}

    def manifest_entry(self) -> dict[str, object]:
        entry = asdict(self)
        for key in ("body", "files"):
            entry.pop(key)
        entry["headers"] = self.headers
        entry["body_file"] = f"{self.name}.body"
        entry["body_bytes"] = len(self.body)
        entry["expect_conversion"] = list(self.expect_conversion)
        return entry


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def noise_image(size: int = 32, mode: str = "L", seed: int = 0) -> Image.Image:
    """Random pixels: they do not compress, so a cut file loses real image data."""
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def plain_png(value: int = 90, size: int = 28) -> bytes:
    return encode(Image.new("L", (size, size), value), "PNG")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def blank_bilevel_png(width: int, height: int) -> bytes:
    """A complete, valid all-black 1-bit PNG of any size, written without holding its pixels.

    Rows are streamed through zlib, so a 400-million-pixel image costs ~50 MB of
    compression work and ~50 KB of output, never an image in memory.
    """
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit gray
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte "None" + packed pixels
    compressor = zlib.compressobj(9)
    chunks = [compressor.compress(row) for _ in range(height)]
    data = b"".join(chunks) + compressor.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", data)
        + _png_chunk(b"IEND", b"")
    )


def sixteen_bit_png() -> bytes:
    pixels = np.linspace(0, 65535, 28 * 28).astype(np.uint16).reshape(28, 28)
    return encode(Image.fromarray(pixels), "PNG")


def cmyk_jpeg() -> bytes:
    return encode(Image.new("CMYK", (28, 28), (0, 128, 255, 30)), "JPEG", quality=90)


def animated_gif() -> bytes:
    frames = [Image.new("L", (28, 28), value) for value in (20, 120, 240)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)


def palette_png_with_transparency() -> bytes:
    img = Image.new("P", (28, 28), 0)
    img.putpalette([255, 0, 0] + [0, 0, 255] + [0, 0, 0] * 254)
    img.paste(1, (0, 0, 14, 28))  # left half blue, right half red
    return encode(img, "PNG", transparency=0)  # red is transparent


def exif_rotated_jpeg() -> bytes:
    img = Image.new("L", (40, 24), 0)
    img.paste(255, (0, 0, 20, 24))  # left half white as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    return encode(img, "JPEG", exif=exif, quality=95)


def pickle_payload(marker: str = "PICKLE_WAS_LOADED") -> bytes:
    """A pickle that creates the file ``marker`` if anything unpickles it (nothing may)."""
    import pickle

    class Marker:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (exec, (f"open({marker!r}, 'w').close()",))

    return pickle.dumps(Marker())


# ---------------------------------------------------------------------------------------------
# request bodies
# ---------------------------------------------------------------------------------------------


def multipart(parts: list[tuple[str, str | None, bytes, str | None]]) -> bytes:
    """A multipart/form-data body; each part is (field, filename or None, data, type)."""
    out = bytearray()
    for name, filename, data, media in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n".encode()
        if media:
            out += f"Content-Type: {media}\r\n".encode()
        out += b"\r\n" + data + b"\r\n"
    out += f"--{BOUNDARY}--\r\n".encode()
    return bytes(out)


def one_file(filename: str, data: bytes, media: str) -> bytes:
    return multipart([("file", filename, data, media)])


def _image_case(
    name: str,
    what: str,
    filename: str,
    data: bytes,
    media: str,
    status: int,
    slug: str | None = None,
    detail: str | None = None,
    image: dict[str, object] | None = None,
    conversion: tuple[str, ...] = (),
) -> BadInput:
    return BadInput(
        name=name,
        what=what,
        path="/score",
        body=one_file(filename, data, media),
        content_type=MULTIPART,
        expect_status=status,
        expect_type=PROBLEM + slug if slug else None,
        expect_detail_prefix=detail,
        expect_image={"filename": filename, **(image or {})},
        expect_conversion=conversion,
        files={filename: data},
    )


def image_cases() -> list[BadInput]:
    """Files sent to ``/score``: broken ones (4xx) and unusual valid ones (200)."""
    png = encode(noise_image(), "PNG")
    jpeg = encode(noise_image(64, "RGB"), "JPEG", quality=95)
    return [
        _image_case(
            "zero-bytes", "an empty file", "empty.png", b"", "image/png",
            422, "undecodable-image", "the file is empty (0 bytes)",
        ),
        _image_case(
            "truncated-png", "a PNG cut in half", "truncated.png", png[: len(png) // 2],
            "image/png", 422, "undecodable-image", "the PNG data is truncated or corrupt",
        ),
        _image_case(
            "truncated-jpeg", "a JPEG cut in half", "truncated.jpg", jpeg[: len(jpeg) // 2],
            "image/jpeg", 422, "undecodable-image", "the JPEG data is truncated or corrupt",
        ),
        _image_case(
            "jpeg-header-only", "the first 6 bytes of a JPEG (was a 500 before the fix)",
            "cut.jpg", jpeg[:6], "image/jpeg",
            422, "undecodable-image", "the image header is truncated or corrupt",
        ),
        _image_case(
            "text-as-png", "plain text named .png and sent as image/png", "notes.png",
            b"this is not an image\n" * 20, "image/png",
            422, "undecodable-image", "cannot identify the data as an image",
        ),
        _image_case(
            "text-as-text", "plain text sent as text/plain", "notes.txt",
            b"this is not an image\n", "text/plain",
            415, "unsupported-media-type", "media type text/plain is not an image",
        ),
        _image_case(
            "decompression-bomb",
            f"a valid {BOMB_SIDE}x{BOMB_SIDE} 1-bit PNG of ~50 KB (Pillow's bomb limit)",
            "bomb.png", blank_bilevel_png(BOMB_SIDE, BOMB_SIDE), "image/png",
            413, "image-too-large", "the image is a decompression bomb",
        ),
        _image_case(
            "huge-dimensions",
            f"a valid {LARGE_SIDE}x{LARGE_SIDE} 1-bit PNG of ~3 KB (the service's pixel limit)",
            "large.png", blank_bilevel_png(LARGE_SIDE, LARGE_SIDE), "image/png",
            413, "image-too-large", f"the image is {LARGE_SIDE}x{LARGE_SIDE} = ",
        ),
        _image_case(
            "pickle-upload", "a Python pickle that runs code when unpickled", "model.pkl",
            pickle_payload(), "application/octet-stream",
            422, "undecodable-image", "cannot identify the data as an image",
        ),
        _image_case(
            "other-image-format", "an ICO file (an image format the service does not take)",
            "icon.ico", encode(Image.new("RGB", (16, 16)), "ICO"), "image/x-icon",
            415, "unsupported-media-type", "image format ICO is not supported",
        ),
        # Valid but unusual: 200, and the image report says what was done.
        _image_case(
            "sixteen-bit-png", "a 16-bit grayscale PNG", "deep.png", sixteen_bit_png(),
            "image/png", 200,
            image={"format": "PNG", "original_mode": "I;16", "converted": True},
            conversion=("16-bit scaled to 8 bits",),
        ),
        _image_case(
            "cmyk-jpeg", "a CMYK JPEG", "cmyk.jpg", cmyk_jpeg(), "image/jpeg", 200,
            image={"format": "JPEG", "original_mode": "CMYK", "converted": True},
            conversion=("CMYK -> RGB", "RGB -> L"),
        ),
        _image_case(
            "animated-gif", "a 3-frame animated GIF (the first frame is scored)",
            "anim.gif", animated_gif(), "image/gif", 200,
            image={"format": "GIF", "converted": True, "frames": 3},
            conversion=("first of 3 frames", "-> L"),
        ),
        _image_case(
            "palette-png-transparency", "a palette PNG with a transparent colour",
            "palette.png", palette_png_with_transparency(), "image/png", 200,
            image={"format": "PNG", "original_mode": "P", "converted": True},
            conversion=("P composited on black -> RGB", "RGB -> L"),
        ),
        _image_case(
            "exif-rotated-jpeg", "a 40x24 JPEG whose EXIF says: rotate 90 degrees",
            "rotated.jpg", exif_rotated_jpeg(), "image/jpeg", 200,
            image={
                "format": "JPEG",
                "original_width": 40,
                "original_height": 24,
                "exif_transposed": True,
                "resized": True,
            },
            conversion=("resized to 28x28",),
        ),
    ]  # fmt: skip


def _request_case(
    name: str,
    what: str,
    path: str,
    body: bytes,
    content_type: str | None,
    status: int,
    slug: str | None,
    detail: str,
    **extra: object,
) -> BadInput:
    """A whole request and its problem: ``slug`` names a problem type of the service's
    own; None means Starlette's plain ``about:blank`` (a 400 of the parser or a 404)."""
    return BadInput(
        name=name,
        what=what,
        path=path,
        body=body,
        content_type=content_type,
        expect_status=status,
        expect_type=PROBLEM + slug if slug else ABOUT_BLANK,
        expect_detail_prefix=detail,
        **extra,  # type: ignore[arg-type]
    )


def request_cases(limits: Limits) -> list[BadInput]:
    """Whole requests that are wrong: size, count, field, body type, JSON."""
    over = limits.max_upload_bytes + 1
    too_many = limits.max_batch_files + 1
    png_part = ("file", "a.png", plain_png(), "image/png")
    one_png = one_file("a.png", plain_png(), "image/png")
    json_type = "application/json"
    sample_errors = [
        ("sample-n-zero", {"n": 0}, "body.n: Input should be greater than or equal to 1"),
        ("sample-n-negative", {"n": -5}, "body.n: Input should be greater than or equal to 1"),
        ("sample-n-not-int", {"n": "many"}, "body.n: Input should be a valid integer"),
        ("sample-steps-negative", {"steps": -1}, "body.steps: Input should be greater than"),
        ("sample-step-size-zero", {"step_size": 0}, "body.step_size: Input should be greater"),
        ("sample-step-size-big", {"step_size": 2.5}, "body.step_size: Input should be less"),
        ("sample-seed-negative", {"seed": -1}, "body.seed: Input should be greater than"),
        ("sample-seed-2-63", {"seed": 2**63}, "body.seed: Input should be less than"),
        ("sample-format-unknown", {"format": "gif"}, "body.format: Input should be 'png'"),
        ("sample-n-above-cap", {"n": 10**6}, "body.n: n must be <= "),
        ("sample-steps-above-cap", {"n": 1, "steps": 10**6}, "body.steps: steps must be <= "),
        ("sample-json-array", [1, 2, 3], "body: Input should be a valid dictionary"),
        ("sample-misspelt-field", {"N": 2}, "body.N: Extra inputs are not permitted"),
    ]
    cases = [
        _request_case(
            "body-over-byte-limit",
            f"an upload of {over} bytes of file data (limit {limits.max_upload_bytes})",
            "/score", one_file("big.png", b"\x00" * over, "image/png"), MULTIPART,
            413, "request-too-large", "the request declares ",
        ),
        _request_case(
            "too-many-files",
            f"{too_many} valid PNGs to /score/batch (limit {limits.max_batch_files})",
            "/score/batch",
            multipart(
                [("files", f"{i}.png", plain_png(i % 256), "image/png") for i in range(too_many)]
            ),
            MULTIPART,
            413, "too-many-files", f"{too_many} files in 'files', above the limit of ",
        ),
        _request_case(
            "wrong-field-name", "a valid PNG in field 'image' instead of 'file'",
            "/score", multipart([("image", "a.png", plain_png(), "image/png")]), MULTIPART,
            422, "validation-error", "body.file: Field required",
        ),
        _request_case(
            "batch-wrong-field-name",
            "valid PNGs in field 'file' instead of 'files' to /score/batch",
            "/score/batch", multipart([png_part]), MULTIPART,
            422, "validation-error", "body.files: Field required",
        ),
        _request_case(
            "field-without-filename",
            "the PNG bytes as a plain form field (no filename), not a file",
            "/score", multipart([("file", None, b"not a file part", None)]), MULTIPART,
            422, "validation-error", "body.file: Value error, Expected UploadFile",
        ),
        _request_case(
            "raw-png-body", "a PNG as the whole body (image/png), not multipart",
            "/score", plain_png(), "image/png",
            415, "unsupported-media-type", "send the request as multipart/form-data, got image/png",
        ),
        _request_case(
            "json-body-to-score", "a JSON body to /score",
            "/score", b'{"file": "aGVsbG8="}', json_type,
            415, "unsupported-media-type",
            "send the request as multipart/form-data, got application/json",
        ),
        _request_case(
            "multipart-without-boundary",
            "Content-Type multipart/form-data with no boundary parameter",
            "/score", one_png, "multipart/form-data",
            400, None, "Missing boundary in multipart",
        ),
        _request_case(
            "multipart-garbage", "a multipart Content-Type whose body is not multipart",
            "/score", b"this is not a multipart body", MULTIPART,
            400, None, "Invalid multipart data",
        ),
        _request_case(
            "sample-malformed-json", "'{not json' to /sample",
            "/sample", b"{not json", json_type,
            422, "validation-error", "body.1: JSON decode error",
        ),
        _request_case(
            "sample-invalid-utf8", "JSON with a byte that is not UTF-8 to /sample",
            "/sample", b'{"n": "\xff"}', json_type,
            400, None, "There was an error parsing the body",
        ),
        _request_case(
            "sample-huge-integer",
            "a 5000-digit integer (above Python's int parsing limit) to /sample",
            "/sample", b'{"seed": ' + b"9" * 5000 + b"}", json_type,
            400, None, "There was an error parsing the body",
        ),
        _request_case(
            "sample-not-json-content-type", "a JSON text sent as text/plain to /sample",
            "/sample", b'{"n": 1}', "text/plain",
            422, "validation-error", "body: Input should be a valid dictionary",
        ),
        _request_case(
            "two-file-parts", "two 'file' parts to /score (one image expected)",
            "/score", multipart([png_part, png_part]), MULTIPART,
            422, "validation-error", "body.file: expected one value, got 2",
        ),
        _request_case(
            "multipart-mixed", "a valid multipart body sent as multipart/mixed",
            "/score", one_png, f"multipart/mixed; boundary={BOUNDARY}",
            415, "unsupported-media-type",
            "send the request as multipart/form-data, got multipart/mixed",
        ),
        _request_case(
            "content-encoding-gzip", "Content-Encoding: gzip on a body that no route decompresses",
            "/score", one_png, MULTIPART,
            415, "unsupported-media-type", "Content-Encoding 'gzip' is not supported",
            extra_headers={"Content-Encoding": "gzip"},
        ),
        _request_case(
            "trailing-slash",
            "/score/ (no redirect, whose Location would come from the Host header)",
            "/score/", one_png, MULTIPART,
            404, None, "no route matches POST /score/",
        ),
        _request_case(
            "evaluate-empty-reference", "reference= (empty) to /evaluate",
            "/evaluate",
            multipart(
                [("files", "a.png", plain_png(), "image/png"), ("reference", None, b"", None)]
            ),
            MULTIPART,
            422, "validation-error", "body.reference: must not be empty",
        ),
    ]  # fmt: skip
    cases += [
        _request_case(
            name, f"{json.dumps(payload)} to /sample",
            "/sample", json.dumps(payload).encode(), json_type,
            422, "validation-error", detail,
        )
        for name, payload, detail in sample_errors
    ]  # fmt: skip
    return cases


def corpus(limits: Limits | None = None) -> list[BadInput]:
    """Every case, files first."""
    return image_cases() + request_cases(limits or Limits())


def write_corpus(outdir: Path, limits: Limits | None = None) -> Path:
    """Write bodies, files and manifest.json under ``outdir``; returns the manifest path."""
    limits = limits or Limits()
    cases = corpus(limits)
    (outdir / "files").mkdir(parents=True, exist_ok=True)
    for case in cases:
        (outdir / f"{case.name}.body").write_bytes(case.body)
        for filename, data in case.files.items():
            (outdir / "files" / filename).write_bytes(data)
    manifest = outdir / "manifest.json"
    manifest.write_text(
        json.dumps(
            {"limits": asdict(limits), "cases": [c.manifest_entry() for c in cases]}, indent=2
        )
        + "\n"
    )
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--max-upload-bytes", type=int, default=DEFAULT_MAX_UPLOAD_BYTES)
    parser.add_argument("--max-batch-files", type=int, default=DEFAULT_MAX_BATCH_FILES)
    args = parser.parse_args(argv)
    limits = Limits(args.max_upload_bytes, args.max_batch_files)
    manifest = write_corpus(args.outdir, limits)
    count = len(json.loads(manifest.read_text())["cases"])
    print(f"wrote {count} cases to {args.outdir} (manifest: {manifest})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
