"""The sink's completeness check: whole images pass in every accepted format, cut-short or changed ones do
not, other formats and oversized pictures are refused, and no bytes make it raise anything but ValueError."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from batch_engine.images import MAX_PIXELS, check_complete
from batch_engine.sim.drawing import render_output

FORMATS = {
    "png": "PNG", "jpg": "JPEG", "webp": "WEBP", "gif": "GIF", "bmp": "BMP", "dds": "DDS", "blp": "BLP"
}
ACCEPTED = ("png", "jpg", "webp", "gif")
#: the mode each format is saved from (DDS wants an alpha channel, BLP a palette)
MODES = {"dds": "RGBA", "blp": "P"}


def sample(ext: str) -> bytes:
    """A real picture in ``ext``'s format: the simulator's output, re-encoded by Pillow."""
    with Image.open(io.BytesIO(render_output(96, 64, prompt="a product on marble", index=0))) as image:
        buffer = io.BytesIO()
        image.convert(MODES.get(ext, "RGB")).save(buffer, format=FORMATS[ext])
    return buffer.getvalue()


@pytest.mark.parametrize("ext", ["png", "jpg", "webp", "gif"])
def test_whole_images_pass_and_name_their_format(ext: str) -> None:
    """A complete PNG, JPEG, WebP or GIF passes and its extension comes back."""
    assert check_complete(sample(ext)) == ext


# A GIF's last byte is its trailer, which holds no picture: without it the image decodes whole.
CUTS = [(ext, keep) for ext in ACCEPTED for keep in (0.1, 0.5, 0.9, -1) if (ext, keep) != ("gif", -1)]


@pytest.mark.parametrize(("ext", "keep"), CUTS)
def test_images_cut_short_are_refused(ext: str, keep: float) -> None:
    """A download cut anywhere (a tenth, half, nine tenths, all but the last byte) is not complete."""
    data = sample(ext)
    cut = len(data) - 1 if keep == -1 else int(len(data) * keep)
    with pytest.raises(ValueError, match="not a complete image"):
        check_complete(data[:cut])


TAILS = [("png", b"junk after IEND"), ("jpg", b"\r\n"), ("webp", b"\x00\x00")]


@pytest.mark.parametrize(("ext", "tail"), TAILS)
def test_bytes_after_the_end_of_a_whole_image_do_not_refuse_it(ext: str, tail: bytes) -> None:
    """Some servers append bytes after the image's end (a newline, padding): the picture is whole."""
    assert check_complete(sample(ext) + tail) == ext


def test_a_png_without_image_data_is_refused() -> None:
    """A PNG of just IHDR and IEND, every CRC right, holds no picture."""
    data = sample("png")
    ihdr_end = 8 + 12 + 13
    with pytest.raises(ValueError, match="no IDAT chunk"):
        check_complete(data[:ihdr_end] + data[-12:])


def test_a_png_with_one_changed_byte_is_refused_by_its_crc() -> None:
    """A PNG at full length with one byte changed in its pixel data fails the chunk's CRC."""
    data = sample("png")
    middle = len(data) // 2
    changed = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
    with pytest.raises(ValueError, match="fails its CRC"):
        check_complete(changed)


@pytest.mark.parametrize("data", [b"", b"<html><body>502 Bad Gateway</body></html>", b"\x89PNG\r\n\x1a\n"])
def test_things_that_are_not_images_are_refused(data: bytes) -> None:
    """An empty body, a proxy's HTML page, a bare PNG signature: none is an image."""
    with pytest.raises(ValueError, match=r"not a complete image|not an image"):
        check_complete(data)


@pytest.mark.parametrize("ext", ["bmp", "dds", "blp"])
def test_formats_the_engine_does_not_keep_are_refused(ext: str) -> None:
    """A whole BMP, DDS or BLP is refused with a message naming the accepted formats: the API sends none of
    them, and their decoders are not worth exposing to foreign bytes."""
    with pytest.raises(ValueError, match="only PNG, JPEG, WebP and GIF"):
        check_complete(sample(ext))


def corrupt_dds() -> bytes:
    """A DDS whose pixel format is a FourCC no decoder knows (Pillow raised NotImplementedError on it)."""
    data = sample("dds")
    return data[:80] + struct.pack("<I", 4) + b"XXXX" + data[88:]


def corrupt_blp() -> bytes:
    """A BLP with an unknown encoding byte (Pillow raised BLPFormatError, a NotImplementedError)."""
    data = sample("blp")
    return data[:8] + b"\x09" + data[9:]


@pytest.mark.parametrize("data", [corrupt_dds(), corrupt_blp()], ids=["dds", "blp"])
def test_a_corrupt_output_in_another_format_is_a_value_error(data: bytes) -> None:
    """A corrupt DDS or BLP output ends in ValueError (the item's download fails), not a traceback."""
    with pytest.raises(ValueError, match="accepted format"):
        check_complete(data)


def png_claiming(width: int, height: int) -> bytes:
    """A small, structurally whole PNG whose IHDR claims ``width`` x ``height`` (every CRC right)."""
    data = sample("png")
    ihdr = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    return data[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) claims ``width`` x ``height``."""
    data = sample("jpg")
    sof = data.index(b"\xff\xc0")
    return data[: sof + 5] + struct.pack(">HH", height, width) + data[sof + 9 :]


@pytest.mark.parametrize(
    "data",
    [png_claiming(30000, 30000), jpeg_claiming(13000, 13000), jpeg_claiming(7000, 7000)],
    ids=["png-30000", "jpeg-13000", "jpeg-7000"],
)
def test_a_picture_too_large_is_refused_from_its_header(data: bytes) -> None:
    """A PNG of 30000x30000 (structurally whole) or a 13000x13000 JPEG is refused by the size in its
    header, before anything is decoded (a 13000x13000 decode alone would take 670 MB)."""
    with pytest.raises(ValueError, match=f"over {MAX_PIXELS:,} pixels are refused"):
        check_complete(data)


def test_a_picture_at_the_limit_passes() -> None:
    """A PNG whose IHDR is exactly at the pixel limit passes the structural check."""
    assert check_complete(png_claiming(MAX_PIXELS // 4, 4)) == "png"


SEEDS = [sample(ext) for ext in FORMATS] + [corrupt_dds(), corrupt_blp(), png_claiming(2**31, 2**31)]


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """One of the sample images, cut, with bytes changed or inserted, or its header's numbers rewritten."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["cut", "flip", "insert", "word"]))
        if action == "cut":
            del data[at:]
        elif action == "flip" and at < len(data):
            data[at] ^= draw(st.integers(1, 255))
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif action == "word" and at + 4 <= len(data):
            data[at : at + 4] = draw(st.sampled_from([0, 1, 2**16 - 1, 2**31, 2**32 - 1])).to_bytes(4, "big")
    return bytes(data)


@settings(max_examples=150, deadline=None)
@given(mutated_images())
def test_any_bytes_are_an_accepted_image_or_a_value_error(data: bytes) -> None:
    """Whatever bytes arrive, the check names an accepted extension or raises ValueError, never else."""
    try:
        ext = check_complete(data)
    except ValueError:
        return
    assert ext in ACCEPTED
