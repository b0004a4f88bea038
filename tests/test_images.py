"""The sink's completeness check: whole images pass in every format, cut-short or changed ones do not."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from batch_engine.images import check_complete
from batch_engine.sim.drawing import render_output

FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP", "gif": "GIF", "bmp": "BMP"}


def sample(ext: str) -> bytes:
    """A real picture in ``ext``'s format: the simulator's output, re-encoded by Pillow."""
    with Image.open(io.BytesIO(render_output(96, 64, prompt="a product on marble", index=0))) as image:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format=FORMATS[ext])
    return buffer.getvalue()


@pytest.mark.parametrize("ext", ["png", "jpg", "webp", "gif"])
def test_whole_images_pass_and_name_their_format(ext: str) -> None:
    """A complete PNG, JPEG, WebP or GIF passes and its extension comes back."""
    assert check_complete(sample(ext)) == ext


def test_a_format_without_a_structural_check_is_decoded_in_full() -> None:
    """A BMP passes: Pillow decodes it whole and names its format, so the file is saved as .bmp."""
    assert check_complete(sample("bmp")) == "bmp"


# A GIF's last byte is its trailer, which holds no picture: without it the image decodes whole.
CUTS = [(ext, keep) for ext in FORMATS for keep in (0.1, 0.5, 0.9, -1) if (ext, keep) != ("gif", -1)]


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
