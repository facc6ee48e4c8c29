"""What a served model reads and answers, family by family, with no web framework in sight.

A data module that can be served gives ``request_codec()``: a ``RequestCodec`` turning one JSON request into
one item of the family's predict data set (the same transform, tokenizer and checks as ``zoo predict``), and a
list of items into a predict batch. ``zoo serve`` (``zoo.serve``) calls ``predict_step`` on that batch and
answers each request with its predict record, made JSON by ``json_record``. So a served answer is the record
``zoo predict`` writes for the same input.

A request the codec refuses raises ``RequestError`` naming the field; the server answers 400 with that message
before the request joins a batch (one bad request never fails the others).
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "RequestCodec",
    "RequestError",
    "class_name",
    "image_field",
    "integer_field",
    "json_record",
    "model_argument",
    "number_field",
    "text_field",
]


class RequestError(ValueError):
    """A request field that is missing, of the wrong type or out of range (answered with HTTP 400)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class RequestCodec:
    """One family's request format. Subclasses set ``fields`` and implement ``parse`` and ``collate``.

    ``fields`` documents the JSON object: ``{name: description}``; ``parse`` refuses any other key, so a typo
    ("sequnce") is named rather than ignored. ``image_fields`` are the fields that also arrive as multipart
    uploads (the server reads the file's bytes into the field). A multipart form's other fields are strings,
    read as JSON where they parse (``seed=3`` is the number 3) except ``text_fields``, which stay as typed: an
    id ``42`` or an expression ``12`` is text, not a number.
    """

    fields: Mapping[str, str] = {}
    image_fields: tuple[str, ...] = ()
    text_fields: tuple[str, ...] = ("id",)

    def parse(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """One predict item from one request (raises ``RequestError``)."""
        raise NotImplementedError

    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """A predict batch from parsed items."""
        raise NotImplementedError

    def for_model(self, model_config: Mapping[str, Any]) -> RequestCodec:
        """This codec narrowed to what the configured model reads, where the family's models differ (a
        class-conditional diffusion model reads no free text). ``model_config`` is the config's ``model`` part
        as a dict (``class_path``, ``init_args``, a checkpoint's hyper-parameters in ``dict_kwargs``), known in
        the HTTP process without building the model. Default: every model of the family reads what the data
        allows."""
        return self

    def check_keys(self, payload: Any) -> Mapping[str, Any]:
        """``payload`` as a mapping holding only known fields."""
        if not isinstance(payload, Mapping):
            raise RequestError("body", f"expected a JSON object with {self._listing()}")
        unknown = sorted(set(payload) - set(self.fields))
        if unknown:
            raise RequestError(unknown[0], f"unknown field; this model takes {self._listing()}")
        return payload

    def _listing(self) -> str:
        return ", ".join(f"{name!r} ({text})" for name, text in self.fields.items())


def model_argument(model_config: Mapping[str, Any], name: str, default: Any = None) -> Any:
    """A constructor argument of the configured model: a checkpoint's hyper-parameter (``dict_kwargs``) over
    the config's own (``init_args``)."""
    for part in ("dict_kwargs", "init_args"):
        arguments = model_config.get(part) or {}
        if name in arguments:
            return arguments[name]
    return default


def class_name(value: Any) -> str | None:
    """The class a config value names: ``{"class_path": "a.b.C", ...}`` or ``"a.b.C"`` -> ``"C"``; an object
    -> its class's name; ``None`` -> ``None``."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        value = value.get("class_path")
        return None if value is None else str(value).rsplit(".", 1)[-1]
    if isinstance(value, str):
        return value.rsplit(".", 1)[-1]
    return type(value).__name__


# --------------------------------------------------------------------------- field readers
def text_field(payload: Mapping[str, Any], name: str, *, required: bool = True, default: str | None = None,
               max_length: int | None = None, alphabet: str | None = None) -> str | None:  # fmt: skip
    """A string field, checked against a length limit and an alphabet (naming the first bad character)."""
    value = payload.get(name, default)
    if value is None:
        if required:
            raise RequestError(name, "missing")
        return None
    if not isinstance(value, str):
        raise RequestError(name, f"expected a string, got {type(value).__name__}")
    if required and not value:
        raise RequestError(name, "empty")
    if max_length is not None and len(value) > max_length:
        raise RequestError(name, f"{len(value)} characters, more than this model's {max_length}")
    if alphabet is not None:
        for position, char in enumerate(value):
            if char not in alphabet:
                raise RequestError(
                    name,
                    f"character {char!r} at position {position} is not one of {''.join(sorted(alphabet))}",
                )
    return value


def integer_field(payload: Mapping[str, Any], name: str, default: int | None = None,
                  low: int | None = None, high: int | None = None) -> int | None:  # fmt: skip
    """An integer field in ``[low, high]``."""
    value = payload.get(name, default)
    if value is None:
        if default is None and name in payload:
            raise RequestError(name, "expected an integer, got null")
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(name, f"expected an integer, got {value!r}")
    _check_range(name, value, low, high)
    return value


def number_field(payload: Mapping[str, Any], name: str, default: float | None = None,
                 low: float | None = None, high: float | None = None) -> float | None:  # fmt: skip
    """A number field in ``[low, high]``."""
    value = payload.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(name, f"expected a number, got {value!r}")
    _check_range(name, value, low, high)
    return float(value)


def _check_range(name: str, value: float, low: float | None, high: float | None) -> None:
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{'' if low is None else low}, {'' if high is None else high}]"
        raise RequestError(name, f"{value} is outside {bounds}")


#: Decoded images larger than this many pixels are refused (a decompression bomb, not a photo)
MAX_IMAGE_PIXELS = 64_000_000


def image_field(payload: Mapping[str, Any], name: str = "image"):
    """A ``PIL.Image`` (RGB) from a base64 string (a ``data:image/...;base64,`` prefix is accepted) or the
    bytes of a multipart upload."""
    from PIL import Image, UnidentifiedImageError

    value = payload.get(name)
    if value is None:
        raise RequestError(name, "missing (a base64-encoded image, or a multipart file upload)")
    if isinstance(value, str):
        encoded = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
        try:
            value = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(name, "is not valid base64") from None
    if not isinstance(value, (bytes, bytearray)):
        raise RequestError(name, f"expected a base64 string, got {type(value).__name__}")
    try:
        with Image.open(io.BytesIO(value)) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise RequestError(name, f"{image.width}x{image.height} pixels is too large to decode")
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise RequestError(name, f"does not decode as an image ({type(error).__name__})") from None


# --------------------------------------------------------------------------- answers
def json_record(
    record: Mapping[str, Any], encode_image: Callable[[Any], Any] | None = None
) -> dict[str, Any]:
    """A predict record as JSON values: tensors and arrays as nested lists, images as base64 PNG."""
    return {key: _json_value(value, encode_image or _png_base64) for key, value in record.items()}


def _json_value(value: Any, encode_image: Callable[[Any], Any]) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.float().tolist() if value.is_floating_point() else value.tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _json_value(v, encode_image) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v, encode_image) for v in value]
    if hasattr(value, "save") and hasattr(value, "mode"):  # a PIL image
        return encode_image(value)
    return value


def _png_base64(image) -> dict[str, str]:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"png_base64": base64.b64encode(buffer.getvalue()).decode("ascii")}
