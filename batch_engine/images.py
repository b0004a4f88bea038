"""Image checks: recognise, verify and decode the pictures the engine downloads."""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
import zlib

from PIL import Image

#: magic-byte prefixes → extension; WebP is checked apart (its tag sits at offset 8)
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (_PNG_MAGIC, "png"),
    (b"\xff\xd8\xff", "jpg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
)
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
    return _decode(data)[0]


def _decode(data: bytes) -> tuple[tuple[int, int], str]:
    """Decode ``data`` completely: its size and Pillow's name of its format; ValueError if not whole."""
    if not data:
        raise ValueError("not an image: the data is empty")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.size, str(image.format or "")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        kind = sniff_extension(data) or "unknown format"
        raise ValueError(f"not a complete image ({kind}, {len(data)} bytes): {exc}") from exc


def check_complete(data: bytes) -> str:
    """Check that ``data`` is a whole image and return its extension; ValueError if not.

    A PNG (what the API sends by default) is checked by its structure, which catches a cut-short or
    corrupted transfer in microseconds where a full decode of a 1024x1024 picture costs milliseconds:
    it must start with IHDR, hold image data and reach IEND with every chunk's CRC right. JPEG, WebP
    and anything else carry no checksum of their own, so they are decoded in full by Pillow, which
    also names formats the magic bytes do not (``bmp``, ``tiff``...).
    """
    if not is_png(data):
        size_and_format = _decode(data)
        return sniff_extension(data) or size_and_format[1].lower() or "bin"
    try:
        _check_png(data)
    except (ValueError, struct.error) as exc:
        raise ValueError(f"not a complete image (png, {len(data)} bytes): {exc}") from exc
    return "png"


def is_png(data: bytes) -> bool:
    """True when ``data`` starts with the PNG signature."""
    return data.startswith(_PNG_MAGIC)


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
        if first and kind != b"IHDR":
            raise ValueError("the first chunk is not IHDR")
        (crc,) = struct.unpack_from(">I", data, stop - 4)
        if zlib.crc32(data[pos + 4 : stop - 4]) != crc:
            raise ValueError(f"the {kind!r} chunk at byte {pos} fails its CRC")
        if kind == b"IEND":
            if not pixels:
                raise ValueError("no IDAT chunk: the file holds no image data")
            return  # anything after IEND is ignored, as decoders do
        pixels = pixels or kind == b"IDAT"
        pos, first = stop, False


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
