"""Image helpers: recognise, verify, decode and draw the pictures the engine and the simulator handle."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import struct
import textwrap
import zlib

from PIL import Image, ImageChops, ImageDraw, ImageFont

#: magic-byte prefixes → extension; WebP is checked apart (its tag sits at offset 8)
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (_PNG_MAGIC, "png"),
    (b"\xff\xd8\xff", "jpg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
)
_DATA_URI = re.compile(r"^data:[^,;]*(?:;[^,;]*)*;base64,", re.IGNORECASE)
_MAX_TEXT_LINES = 12
_MIN_FONT_PX = 8

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


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


def render_output(width: int, height: int, *, prompt: str, index: int, seed: int = 0) -> bytes:
    """A PNG of exactly ``width`` x ``height``: colour from (prompt, index, seed), the prompt, ``#index``."""
    background = _colour(f"{seed}|{index}|{prompt}")
    image = Image.new("RGB", (width, height), background)
    lines = [*_wrap(prompt, width=width, height=height), f"#{index}"]
    _draw_lines(image, lines, colour=_contrast(background))
    return _png(image)


def render_input(name: str, width: int = 512, height: int = 512) -> bytes:
    """A sample input picture: a diagonal gradient, a circle, a square, and ``name`` on a dark band below."""
    base = _colour(f"input|{name}")
    image = _gradient(width, height, base)
    draw = ImageDraw.Draw(image)
    unit = min(width, height)
    draw.ellipse(_box(width * 0.15, height * 0.2, unit * 0.3), fill=_colour(f"circle|{name}"))
    draw.rectangle(_box(width * 0.55, height * 0.45, unit * 0.3), fill=_colour(f"square|{name}"))
    draw.rectangle((0, height * 5 // 6, width, height), fill=(24, 24, 24))
    _draw_lines(image, [name], colour=(245, 245, 245), top=height * 5 // 6 + height // 48)
    return _png(image)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _colour(key: str) -> tuple[int, int, int]:
    digest = hashlib.sha256(key.encode()).digest()
    return digest[0], digest[1], digest[2]


def _contrast(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    # ITU-R BT.601 luma: dark text on light backgrounds, white on dark ones.
    luma = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    return (16, 16, 16) if luma > 140 else (245, 245, 245)


def _box(left: float, top: float, side: float) -> tuple[int, int, int, int]:
    return int(left), int(top), int(left + side), int(top + side)


def _gradient(width: int, height: int, colour: tuple[int, int, int]) -> Image.Image:
    vertical = Image.linear_gradient("L")
    ramp = ImageChops.add(vertical, vertical.transpose(Image.Transpose.ROTATE_90), scale=2.0)
    ramp = ramp.resize((width, height))
    solid = Image.new("RGB", (width, height), colour)
    return Image.composite(solid, Image.new("RGB", (width, height), (255, 255, 255)), ramp)


def _font_px(width: int, height: int) -> int:
    return max(_MIN_FONT_PX, min(width, height) // 16)


def _font(px: int) -> Font:
    # Loaded per drawing (~30 µs), not cached: renders run in worker threads and a FreeType face is not
    # documented as safe to share between them.
    return ImageFont.load_default(size=px)


def _wrap(prompt: str, *, width: int, height: int) -> list[str]:
    px = _font_px(width, height)
    columns = max(4, int(width * 0.9 / (px * 0.55)))
    rows = max(1, min(_MAX_TEXT_LINES, int(height * 0.8 / (px * 1.25)) - 1))
    return textwrap.wrap(prompt, width=columns, max_lines=rows, placeholder=" …") or [""]


def _draw_lines(
    image: Image.Image, lines: list[str], *, colour: tuple[int, int, int], top: int | None = None
) -> None:
    width, height = image.size
    px = _font_px(width, height)
    font = _font(px)
    draw = ImageDraw.Draw(image)
    step = int(px * 1.25)
    if top is None:
        top = max(0, (height - step * len(lines)) // 2)
    for row, line in enumerate(lines):
        draw.text((width // 20, top + row * step), line, font=font, fill=colour)
