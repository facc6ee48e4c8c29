"""Shared-encoder multitask Transformer: per-task layers and heads, cached decoding, task weighting.

``from zoo.multitask import MultitaskTransformer, MultitaskModule, TaskSpec, GradNorm``; the data
module is ``zoo.datamodules.MultitaskDataModule``. ``MultitaskModule`` also reads checkpoints written
before the architecture became ``model_name`` + ``model_kwargs``.
"""

from zoo.multitask.decoding import beam_search, greedy_search
from zoo.multitask.model import MultitaskTransformer
from zoo.multitask.module import MultitaskModule
from zoo.multitask.tasks import TASK_TYPES, TaskSpec
from zoo.multitask.vocab import Vocabulary
from zoo.multitask.weighting import (
    DynamicWeightAverage,
    GradNorm,
    LossTrend,
    StaticWeighting,
    TaskWeighting,
    UncertaintyWeighting,
)

__all__ = [
    "TASK_TYPES",
    "DynamicWeightAverage",
    "GradNorm",
    "LossTrend",
    "MultitaskModule",
    "MultitaskTransformer",
    "StaticWeighting",
    "TaskSpec",
    "TaskWeighting",
    "UncertaintyWeighting",
    "Vocabulary",
    "beam_search",
    "greedy_search",
]
