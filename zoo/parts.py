"""Swappable parts of a module: small frozen dataclasses given as constructor arguments.

A part (a LoRA adapter, and in latent diffusion the objective, the conditioning, the sampling defaults, the
autoencoder's loss...) is one argument of a LightningModule that YAML sets as a group (``objective: {snr_gamma: 5.0}``)
or, where a part has several kinds under an abstract base, chooses by class (``conditioning: {class_path:
CaptionConditioning}``). The same argument reaches the module in three forms: the dataclass itself (Python,
or jsonargparse), its fields as a dict (a checkpoint's hyper-parameters, a config dump), or
``{"class_path", "init_args"}`` for a kind of an abstract part. ``resolve_part`` turns any of them into
the dataclass; ``part_hparams`` turns it back into plain data, which is what the modules save, so that a
checkpoint holds no pickled classes and loads with ``torch.load(weights_only=True)``. ``plain_part`` does
both: a module calls it on each part argument before ``ZooModule.__init__`` saves the arguments.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, is_dataclass
from typing import Any, TypeVar

__all__ = ["part_hparams", "plain_part", "resolve_part"]

T = TypeVar("T")


def _kinds(base: type) -> list[type]:
    """``base`` and every subclass defined so far (no import is ever triggered by a checkpoint's text)."""
    found, todo = [], [base]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def _class_named(class_path: str, base: type) -> type:
    name = class_path.rsplit(".", 1)[-1]
    for cls in _kinds(base):
        if cls.__name__ == name and not inspect.isabstract(cls):
            return cls
    known = sorted(c.__name__ for c in _kinds(base) if not inspect.isabstract(c))
    raise ValueError(f"{class_path!r} is not a kind of {base.__name__}: expected one of {known}")


def resolve_part(value: Any, base: type[T]) -> T | None:
    """``value`` (an instance, a dict of fields, ``{"class_path", "init_args"}`` or ``None``) as a ``base``."""
    if value is None or isinstance(value, base):
        return value
    if isinstance(value, dict) and "class_path" in value:
        return _class_named(value["class_path"], base)(**(value.get("init_args") or {}))
    if isinstance(value, dict):
        if inspect.isabstract(base):
            raise ValueError(f"a {base.__name__} needs a class_path (one of its kinds), got {value}")
        return base(**value)
    if isinstance(value, str):  # what an earlier version's flat arguments held, e.g. conditioning="class"
        raise ValueError(
            f"expected a {base.__name__} or a dict of its fields, got the string {value!r}; a checkpoint of an "
            "earlier version is converted with `zoo upgrade-checkpoint OLD.ckpt NEW.ckpt`"
        )
    raise TypeError(f"expected a {base.__name__} or a dict of its fields, got {type(value).__name__}")


def part_hparams(value: Any, base: type) -> dict | None:
    """The plain-data form of a part: its fields, under a ``class_path`` when ``base`` has several kinds."""
    if value is None:
        return None
    if not is_dataclass(value):
        raise TypeError(f"expected a {base.__name__} dataclass, got {type(value).__name__}")
    fields = asdict(value)
    if inspect.isabstract(base):
        cls = type(value)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": fields}
    return fields


def plain_part(value: Any, base: type) -> dict | None:
    """``value`` in any form, checked (its dataclass is built) and returned as plain data."""
    return part_hparams(resolve_part(value, base), base)
