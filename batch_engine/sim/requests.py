"""What the simulated API checks in a submit body or an images form, worded as the API words it."""

from collections.abc import Iterator
from typing import Any

from batch_engine.images import sniff_extension
from batch_engine.sim.config import (
    FIXED_SIZES,
    IMAGES_MODELS,
    IMAGES_SIZES,
    SIZE_PATTERN,
    SimConfig,
    SimModel,
)

_QUALITIES = frozenset({"auto", "low", "medium", "high"})
_BACKGROUNDS = frozenset({"auto", "opaque", "transparent"})
_RESPONSE_FORMATS = frozenset({"url", "b64_json"})


def request_problems(model: SimModel, task: str, body: Any, config: SimConfig) -> Iterator[str]:
    """Each thing wrong with a submit body, as the API would word it (naming the field), in check order."""
    if not isinstance(body, dict):
        yield "the request body must be a JSON object"
        return
    yield from _prompt_problems(body.get("prompt"))
    if task == "image-edit":
        yield from _image_problems(model.image_field, body.get(model.image_field), config=config)
    yield from _n_problems(body.get("n", 1))
    yield from _size_problems(body.get("size", "1024x1024"), fixed=model.fixed_sizes)
    for name, allowed in (("quality", _QUALITIES), ("background", _BACKGROUNDS)):
        yield from _enum_problems(name, body.get(name, "auto"), allowed)
    if config.refuse_transparent and not model.fixed_sizes and body.get("background") == "transparent":
        yield "Invalid 'background': 'transparent' is not supported by this model"
    response_format = body.get("response_format", model.default_format)
    yield from _enum_problems("response_format", response_format, _RESPONSE_FORMATS)
    if not isinstance(body.get("enable_sync_mode", False), bool):
        yield "Invalid 'enable_sync_mode': expected a boolean"


def _prompt_problems(prompt: Any) -> Iterator[str]:
    if prompt is None:
        yield "Missing required parameter: 'prompt'"
    elif not isinstance(prompt, str) or not 1 <= len(prompt) <= 32000:
        yield "Invalid 'prompt': expected a string of 1 to 32000 characters"


def _image_problems(name: str, images: Any, *, config: SimConfig) -> Iterator[str]:
    if isinstance(images, str) and name == "image":
        images = [images]
    if images is None:
        yield f"Missing required parameter: '{name}'"
    elif not isinstance(images, list) or not 1 <= len(images) <= 16:
        yield f"Invalid '{name}': expected a list of 1 to 16 image URLs"
    else:
        schemes = ("http://", "https://", "data:") if config.accept_data_uris else ("http://", "https://")
        bad = [i for i, url in enumerate(images) if not (isinstance(url, str) and url.startswith(schemes))]
        if bad:
            yield f"Invalid '{name}[{bad[0]}]': expected a public http(s) URL"


def _n_problems(n: Any) -> Iterator[str]:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 10:
        yield f"Invalid 'n': expected an integer from 1 to 10, got {n!r}"


def _size_problems(size: Any, *, fixed: bool) -> Iterator[str]:
    if fixed:
        if size not in FIXED_SIZES:
            yield f"Invalid 'size': {size!r}; this model supports {', '.join(sorted(FIXED_SIZES))}"
        return
    if size == "auto":
        return
    match = SIZE_PATTERN.match(size) if isinstance(size, str) else None
    if match is None:
        yield f"Invalid 'size': {size!r}; expected 'auto' or WIDTHxHEIGHT, e.g. 1024x1024"
        return
    yield from _custom_size_problems(int(match[1]), int(match[2]))


def _custom_size_problems(width: int, height: int) -> Iterator[str]:
    size = f"{width}x{height}"
    if max(width, height) > 3840:
        yield f"Invalid 'size': {size}; the longest edge must be at most 3840 pixels"
    if width % 16 or height % 16:
        yield f"Invalid 'size': {size}; both edges must be multiples of 16"
    if min(width, height) == 0 or max(width, height) > 3 * min(width, height):
        yield f"Invalid 'size': {size}; the aspect ratio must be at most 3:1"
    if not 655_360 <= width * height <= 8_294_400:
        yield f"Invalid 'size': {size}; total pixels must be between 655,360 and 8,294,400"


def _enum_problems(name: str, value: Any, allowed: frozenset[str]) -> Iterator[str]:
    if value not in allowed:
        yield f"Invalid '{name}': {value!r}; expected one of {', '.join(sorted(allowed))}"


def images_form_problems(fields: dict[str, str], images: list[bytes]) -> Iterator[str]:
    """Each thing wrong with an OpenAI-format edit (its form fields and ``image[]`` parts), in check order."""
    model = fields.get("model")
    if model is None:
        yield "Missing required parameter: 'model'"
    elif model not in IMAGES_MODELS:
        known = ", ".join(sorted(IMAGES_MODELS))
        yield f"Invalid 'model': {model!r} is not supported here; use one of {known}"
    if not 1 <= len(images) <= 16:
        yield f"Invalid 'image': expected 1 to 16 image files, got {len(images)}"
    for k, data in enumerate(images):
        if sniff_extension(data[:16]) is None:
            yield f"Invalid 'image[{k}]': expected a PNG, JPEG, WebP or GIF file"
    yield from _prompt_problems(fields.get("prompt"))
    size = fields.get("size", "auto")
    if size not in IMAGES_SIZES:
        yield f"Invalid 'size': {size!r}; this endpoint supports {', '.join(sorted(IMAGES_SIZES))}"
    n = fields.get("n", "1")
    if not (n.isdigit() and 1 <= int(n) <= 10):
        yield f"Invalid 'n': expected an integer from 1 to 10, got {n!r}"
    for name, allowed in (("quality", _QUALITIES), ("background", _BACKGROUNDS)):
        yield from _enum_problems(name, fields.get(name, "auto"), allowed)
