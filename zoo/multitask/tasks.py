"""Task declarations: what a user writes in YAML to add a task without code.

A task is a name, a type (one of ``TASK_TYPES``), its number of classes (or regression outputs)
and a loss weight; classification tasks may name their classes, which predictions then report.
Generation tasks decode into the shared vocabulary, so they declare no class count, only the longest
target they may produce.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "GENERATION",
    "REGRESSION",
    "SEQUENCE_CLASSIFICATION",
    "TASK_TYPES",
    "TOKEN_CLASSIFICATION",
    "TaskSpec",
    "validate_tasks",
]

SEQUENCE_CLASSIFICATION = "sequence_classification"
TOKEN_CLASSIFICATION = "token_classification"
REGRESSION = "regression"
GENERATION = "generation"
TASK_TYPES = (SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION, REGRESSION, GENERATION)

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


@dataclass
class TaskSpec:
    """One task, as declared in YAML (``data.init_args.tasks``, linked into the model).

    Args:
        name: identifier used for heads, log keys (``val/<name>/acc``) and data folders.
        type: ``sequence_classification`` | ``token_classification`` | ``regression`` | ``generation``.
        num_classes: classes for the two classification types; outputs per example for
            regression (default 1); unused for generation (the shared vocabulary is the output).
        loss_weight: the static weight; adaptive weightings multiply their weights by it.
        max_target_length: longest generated sequence (tokens, end-of-sequence included).
        label_names: the classes' names in id order (classification types), written in predictions
            instead of class ids.
    """

    name: str
    type: str
    num_classes: int | None = None
    loss_weight: float = 1.0
    max_target_length: int = 32
    label_names: list[str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(f"task name {self.name!r} must be an identifier (letters, digits, '_')")
        if self.type not in TASK_TYPES:
            raise ValueError(
                f"task {self.name!r}: unknown type {self.type!r}; expected one of {', '.join(TASK_TYPES)}"
            )
        if self.type == REGRESSION and self.num_classes is None:
            self.num_classes = 1
        if self.type in (SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION) and (
            self.num_classes is None or self.num_classes < 2
        ):
            raise ValueError(
                f"task {self.name!r} ({self.type}): num_classes must be >= 2, got {self.num_classes}"
            )
        if self.type == REGRESSION and self.num_classes < 1:
            raise ValueError(f"task {self.name!r} (regression): num_classes (outputs) must be >= 1")
        if self.loss_weight < 0:
            raise ValueError(f"task {self.name!r}: loss_weight must be >= 0, got {self.loss_weight}")
        if self.max_target_length < 1:
            raise ValueError(f"task {self.name!r}: max_target_length must be >= 1")
        if self.label_names is not None:
            self._check_label_names()

    def _check_label_names(self) -> None:
        if self.type not in (SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION):
            raise ValueError(f"task {self.name!r} ({self.type}): only classification tasks take label_names")
        names = list(self.label_names)
        if len(names) != self.num_classes or not all(isinstance(n, str) for n in names):
            raise ValueError(
                f"task {self.name!r}: label_names must be {self.num_classes} strings (num_classes), "
                f"got {names!r}"
            )
        self.label_names = names


def validate_tasks(tasks: list[TaskSpec] | tuple[TaskSpec, ...]) -> list[TaskSpec]:
    """Accept dicts too (Python users); reject an empty list and duplicate names."""
    specs = [t if isinstance(t, TaskSpec) else TaskSpec(**t) for t in tasks]
    if not specs:
        raise ValueError("at least one task must be declared")
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise ValueError(f"task {spec.name!r} is declared twice")
        seen.add(spec.name)
    return specs
