"""Image checks: recognise, verify and decode the pictures the engine downloads.

Downloads are foreign bytes. Only the formats the engine means to keep are opened at all (PNG, JPEG,
WebP, GIF: what the API sends and a browser shows), each by its own Pillow plugin, chosen by its magic
bytes, so that no other decoder (DDS, BLP, ...) ever sees the data. Every image's size is read from its
header and checked against `MAX_PIXELS` before a single pixel is decoded, and whatever a decoder raises
becomes a ValueError: the caller fetches the output again, and in the end fails the item, never the run.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
import zlib
from collections.abc import Callable

from PIL import GifImagePlugin, ImageFile, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

#: Four times the largest picture the API makes (3840x2160, 8,294,400 pixels). A 2 MB JPEG can say
#: 13000x13000 in its header, which would decode to 670 MB; at this cap a decode stays near 130 MB.
MAX_PIXELS = 4 * 8_294_400

#: magic-byte prefixes → extension; WebP is checked apart (its tag sits at offset 8)
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (_PNG_MAGIC, "png"),
    (b"\xff\xd8\xff", "jpg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
)
#: The one decoder each accepted format is opened with (never Image.open, which tries every plugin).
_OPENERS: dict[str, Callable[[io.BytesIO], ImageFile.ImageFile]] = {
    "png": PngImagePlugin.PngImageFile,
    "jpg": JpegImagePlugin.JpegImageFile,
    "webp": WebPImagePlugin.WebPImageFile,
    "gif": GifImagePlugin.GifImageFile,
}
_IHDR_SIZE = struct.Struct(">II")
_DATA_URI = re.compile(r"^data:[^,;]*(?:;[^,;]*)*;base64,", re.IGNORECASE)


def sniff_extension(data: bytes) -> str | None:
    """The file extension the magic bytes say (``png``, ``jpg``, ``webp``, ``gif``), or None."""
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def verify_image(data: bytes) -> tuple[int, int]:
    """Decode ``data`` completely and return ``(width, height)``; ValueError if it is not a whole image."""
    return _decode(data, _accepted_format(data))


def check_complete(data: bytes) -> str:
    """Check that ``data`` is a whole image of an accepted format and return its extension; else ValueError.

    A PNG (what the API sends by default) is checked by its structure, which catches a cut-short or
    corrupted transfer in microseconds where a full decode of a 1024x1024 picture costs milliseconds:
    it must start with IHDR, hold image data and reach IEND with every chunk's CRC right, and its IHDR
    size must be within `MAX_PIXELS`. JPEG, WebP and GIF carry no checksum of their own, so they are
    decoded in full, after their header's size has passed the same check.
    """
    ext = _accepted_format(data)
    if ext != "png":
        _decode(data, ext)
        return ext
    try:
        _check_png(data)
    except (ValueError, struct.error) as exc:
        raise ValueError(f"not a complete image (png, {len(data)} bytes): {exc}") from exc
    return "png"


def is_png(data: bytes) -> bool:
    """True when ``data`` starts with the PNG signature."""
    return data.startswith(_PNG_MAGIC)


def _accepted_format(data: bytes) -> str:
    if not data:
        raise ValueError("not an image: the data is empty")
    ext = sniff_extension(data)
    if ext is None:
        raise ValueError(
            f"not an image of an accepted format ({len(data)} bytes starting {data[:8]!r}): "
            "only PNG, JPEG, WebP and GIF are kept"
        )
    return ext


def _check_pixels(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f"the image says it is {width}x{height} pixels")
    if width * height > MAX_PIXELS:
        raise ValueError(
            f"the image is {width}x{height} ({width * height:,} pixels); "
            f"images over {MAX_PIXELS:,} pixels are refused"
        )


def _decode(data: bytes, ext: str) -> tuple[int, int]:
    """Open ``data`` with its format's own decoder, check its size, then decode every pixel."""
    try:
        with _OPENERS[ext](io.BytesIO(data)) as image:
            size: tuple[int, int] = image.size
            _check_pixels(*size)
            image.load()
            return size
    except Exception as exc:  # a decoder may raise anything (struct.error, IndexError, ...): all mean "bad"
        raise ValueError(f"not a complete image ({ext}, {len(data)} bytes): {exc}") from exc


def _check_png(data: bytes) -> None:
    pos, end = len(_PNG_MAGIC), len(data)
    first, pixels = True, False
    while True:
        if pos + 12 > end:
            raise ValueError("no IEND chunk (cut short?)")
        (length,) = struct.unpack_from(">I", data, pos)
        kind = data[pos + 4 : pos + 8]
        stop = pos + 12 + length
        if stop > end:
            raise ValueError(f"the {kind!r} chunk runs past the end (cut short?)")
        if first:
            _check_ihdr(kind, data[pos + 8 : stop - 4])
        (crc,) = struct.unpack_from(">I", data, stop - 4)
        if zlib.crc32(data[pos + 4 : stop - 4]) != crc:
            raise ValueError(f"the {kind!r} chunk at byte {pos} fails its CRC")
        if kind == b"IEND":
            if not pixels:
                raise ValueError("no IDAT chunk: the file holds no image data")
            return  # anything after IEND is ignored, as decoders do
        pixels = pixels or kind == b"IDAT"
        pos, first = stop, False


def _check_ihdr(kind: bytes, body: bytes) -> None:
    if kind != b"IHDR":
        raise ValueError("the first chunk is not IHDR")
    if len(body) != 13:
        raise ValueError(f"the IHDR chunk holds {len(body)} bytes, not 13")
    _check_pixels(*_IHDR_SIZE.unpack_from(body))


def decode_b64_output(value: str) -> bytes:
    """The bytes of a base64 output, ``data:image/...;base64,`` prefix or not; ValueError if invalid."""
    text = _DATA_URI.sub("", value.strip(), count=1)
    text = re.sub(r"\s+", "", text).replace("-", "+").replace("_", "/")
    if not text:
        raise ValueError("empty base64 output")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"invalid base64 output ({len(value)} chars): {exc}") from exc
