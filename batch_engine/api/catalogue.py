"""What the engine knows of each model: one row per model in ``MODELS``, and the rules that read it.

Adding a model is adding a row. A well-formed ``provider/model`` that has no row is a sibling targeted by
configuration: ``spec_for`` answers with the gpt-image-2 family's rules under that name.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

IMAGE_EDIT = "image-edit"
#: The OpenAI-format route's one endpoint (api-facts.md, "The OpenAI-format route"): edits, answered
#: synchronously.
OPENAI_IMAGES_PATH = "/v1/images/edits"
#: The sizes that route takes, whatever the model (the vendor page's list).
OPENAI_IMAGES_SIZES = ("auto", "1536x1024", "1024x1536", "1672x941", "941x1672")
TEXT_TO_IMAGE = "text-to-image"

#: Each task the engine knows, and whether its requests carry input images.
TASK_TAKES_IMAGES: Mapping[str, bool] = MappingProxyType({IMAGE_EDIT: True, TEXT_TO_IMAGE: False})

#: ``provider/model``: it becomes two segments of the submit URL, so only URL-safe characters.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$"

#: The gpt-image-2 family's size rules (api-facts.md, "Request body").
FREE_MAX_EDGE = 3840
FREE_EDGE_MULTIPLE = 16
FREE_MAX_RATIO = 3.0
FREE_MIN_PIXELS = 655_360
FREE_MAX_PIXELS = 8_294_400

#: Five digits an edge at most: int() of thousands of digits is slow, and past 4,300 refused.
_SIZE = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")


@dataclass(frozen=True)
class ModelSpec:
    """One model's rules, as far as the engine has to know them."""

    name: str  #: ``provider/model``, e.g. ``openai/gpt-image-2-plus``
    tasks: frozenset[str]  #: the tasks it serves, e.g. ``{"image-edit"}``
    image_field: str  #: wire name of the input image list: ``images``, or ``image`` for gpt-image-1
    default_response_format: str  #: what the server sends when the request names none
    size_rule: str  #: ``free`` (the gpt-image-2 family's arithmetic rules) or ``fixed``
    fixed_sizes: frozenset[str]  #: the only sizes a ``fixed`` model takes, besides ``auto``
    supports_quality: bool  #: False: ``quality`` is ignored (the -plus models), so it is not sent
    transparent_doubtful: bool  #: ``background: transparent`` is reported not to work
    expected_seconds: float  #: typical inference time: the prior for the first poll
    #: the ``model`` the OpenAI-format endpoint (``/v1/images/edits``) knows it by; None: it has no such route
    openai_images_model: str | None = None

    @property
    def short_name(self) -> str:
        return self.name.rpartition("/")[2]


_GPT_IMAGE_2 = ModelSpec(
    name="openai/gpt-image-2",
    tasks=frozenset({IMAGE_EDIT, TEXT_TO_IMAGE}),
    image_field="images",
    default_response_format="url",
    size_rule="free",
    fixed_sizes=frozenset(),
    supports_quality=True,
    transparent_doubtful=True,
    expected_seconds=60.0,
)

MODELS: Mapping[str, ModelSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            dataclasses.replace(
                _GPT_IMAGE_2,
                name="openai/gpt-image-2-plus",
                tasks=frozenset({IMAGE_EDIT}),
                supports_quality=False,
                openai_images_model="gpt-image-2-plus",
            ),
            # Known from the OpenAI-format route's page; on the prediction route it is taken to follow
            # its -plus sibling's rules (unsure: no page documents it there).
            dataclasses.replace(
                _GPT_IMAGE_2,
                name="openai/gpt-image-1.5-plus",
                tasks=frozenset({IMAGE_EDIT}),
                supports_quality=False,
                openai_images_model="gpt-image-1.5-plus",
            ),
            _GPT_IMAGE_2,
            ModelSpec(
                name="openai/gpt-image-1",
                tasks=frozenset({IMAGE_EDIT}),
                image_field="image",
                default_response_format="b64_json",
                size_rule="fixed",
                fixed_sizes=frozenset({"1024x1024", "1536x1024", "1024x1536"}),
                supports_quality=True,
                transparent_doubtful=False,
                expected_seconds=45.0,
            ),
        )
    }
)

DEFAULT_MODEL = "openai/gpt-image-2-plus"
DEFAULT_TASK = IMAGE_EDIT


def model_spec(name: str) -> ModelSpec | None:
    """The row for ``name``, or None when the engine does not know the model."""
    return MODELS.get(name)


def is_model_name(name: str) -> bool:
    """Whether ``name`` is a well-formed ``provider/model``."""
    return re.match(MODEL_NAME_PATTERN, name) is not None


def spec_for(name: str) -> ModelSpec:
    """The row for ``name``; for an unknown sibling, the gpt-image-2 family's rules under its name."""
    known = MODELS.get(name)
    if known is not None:
        return known
    return dataclasses.replace(
        _GPT_IMAGE_2, name=name, tasks=frozenset(TASK_TAKES_IMAGES), transparent_doubtful=False
    )


def size_problem(spec: ModelSpec, size: str) -> str | None:
    """None when ``spec`` accepts ``size``, else a sentence naming every rule it breaks."""
    if size == "auto":
        return None
    if spec.size_rule == "fixed":
        return None if size in spec.fixed_sizes else _fixed_size_problem(spec)
    match = _SIZE.match(size)
    if match is None:
        return f"size {size!r} is not 'auto' or WIDTHxHEIGHT, e.g. 1024x1024"
    broken = _free_size_rules(int(match[1]), int(match[2]))
    return "; ".join(broken) if broken else None


def _fixed_size_problem(spec: ModelSpec) -> str:
    sizes = sorted(spec.fixed_sizes, key=lambda s: (len(s), s))
    return f"{spec.short_name} accepts only {', '.join(sizes)} or auto"


def _free_size_rules(width: int, height: int) -> list[str]:
    if width == 0 or height == 0:
        return ["width and height must both be positive"]
    broken = [
        f"{name} {edge} is not a multiple of {FREE_EDGE_MULTIPLE}"
        for name, edge in (("width", width), ("height", height))
        if edge % FREE_EDGE_MULTIPLE
    ]
    if max(width, height) > FREE_MAX_EDGE:
        broken.append(f"longest edge {max(width, height)} exceeds {FREE_MAX_EDGE}")
    ratio = max(width, height) / min(width, height)
    if ratio > FREE_MAX_RATIO:
        broken.append(f"aspect ratio {ratio:.1f}:1 exceeds {FREE_MAX_RATIO:.0f}:1")
    pixels = width * height
    if not FREE_MIN_PIXELS <= pixels <= FREE_MAX_PIXELS:
        allowed = f"{FREE_MIN_PIXELS:,} to {FREE_MAX_PIXELS:,}"
        broken.append(f"{width}x{height} is {pixels:,} pixels; the model takes {allowed}")
    return broken


def wire_body(spec: ModelSpec, request: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON body to POST for ``request`` (manifest field names), in the model's own dialect."""
    body = dict(request)
    if "images" in body and spec.image_field != "images":
        body[spec.image_field] = body.pop("images")
    body.setdefault("response_format", spec.default_response_format)
    if not spec.supports_quality:
        body.pop("quality", None)
    return body


def openai_images_problem(spec: ModelSpec, task: str) -> str | None:
    """Why the OpenAI-format route cannot serve ``task`` with this model, or None."""
    if task != IMAGE_EDIT:
        return f"the openai-images route edits images; {task} has no such route: remove inputs.route"
    if spec.openai_images_model is not None:
        return None
    served = ", ".join(name for name, row in MODELS.items() if row.openai_images_model is not None)
    return (
        f"the openai-images route has no endpoint for {spec.name}: it serves {served}; change the model, "
        "or stage the files with inputs: {upload: s3://bucket/prefix/}"
    )


def openai_images_fields(spec: ModelSpec, request: Mapping[str, Any]) -> dict[str, str]:
    """The form fields of an OpenAI-format edit of ``request`` (its files go as ``image[]`` parts).

    The route answers with the pictures themselves, when they are done: ``response_format`` and
    ``enable_sync_mode`` have no meaning there and are not sent.
    """
    if spec.openai_images_model is None:
        raise ValueError(f"{spec.name} has no OpenAI-format route")
    body = wire_body(spec, request)
    for name in (spec.image_field, "response_format", "enable_sync_mode"):
        body.pop(name, None)
    fields = {"model": spec.openai_images_model}
    fields.update({name: _form_value(value) for name, value in body.items()})
    return fields


def _form_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def submit_path(model: str, task: str) -> str:
    """The submit endpoint's path, e.g. ``/api/v3/openai/gpt-image-2-plus/image-edit``."""
    return f"/api/v3/{model}/{task}"
