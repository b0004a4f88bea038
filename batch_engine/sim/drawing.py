"""The simulator's pictures: outputs of exactly the requested size with the prompt drawn on, sample inputs."""

from __future__ import annotations

import hashlib
import io
import textwrap

from PIL import Image, ImageChops, ImageDraw, ImageFont

_MAX_TEXT_LINES = 12
_MIN_FONT_PX = 8

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


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
