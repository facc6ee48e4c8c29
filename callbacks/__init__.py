"""Reusable Lightning callbacks, installed as ``zoo.callbacks``; usable from YAML
(``trainer.callbacks: - class_path: zoo.callbacks.EMA``) and from Python with any LightningModule.

- ``EMA``: exponential moving average of the weights (timm-style decay warmup, delayed start, every-N
  updates on real optimizer steps only, fused ``torch._foreach`` update, evaluation on the EMA weights,
  exact resume, ``EMA.export`` for a checkpoint carrying the EMA weights).
- ``Distillation`` / ``SelfDistillation``: knowledge distillation from a fixed teacher (``soft``, ``hard``,
  ``deit``) or from an EMA of the student.
- ``TrainingMonitor``: gradient/weight/update statistics, throughput and memory; NaN/Inf, loss-spike,
  exploding/vanishing-gradient, dead-parameter and data checks with ``warn`` / ``skip_step`` / ``rollback`` / ``stop``;
  a JSON + Markdown report at fit end.
- ``ThroughputMonitor``: Lightning's, with the FLOPs of a step counted on the first real batch and the device's
  peak known (GPU tables, a measured CPU rate): samples/s, tokens/s, TFLOP/s and MFU with nothing to declare.
- ``zoo.callbacks.compression`` (``MagnitudePruning``, ``StructuredPruning``, ``Quantization``, ``WeightSharing``,
  also exported here): pruning with a cubic schedule, heads/MLP units/blocks/conv channels physically removed,
  int8 dynamic/static/QAT and GPTQ int4, k-means weight sharing; checkpoints carry the architecture changes.

Interfaces a LightningModule offers so these callbacks work on it (every zoo family does):
- ``module.forward(batch_inputs)`` returns the prediction the loss is computed on.
- ``module.distillation_targets(batch) -> (student_logits, labels)``: what ``Distillation`` needs. The
  logits are a tensor, or ``(class_logits, distillation_logits)`` for a model with a distillation token
  (DeiT); labels are class indices or soft targets. Batch-level augmentation (mixup) is written back into
  the batch, so the teacher, called as ``teacher(batch[input_key])`` (dict batches; ``batch[0]`` for
  tuples), sees exactly what the student saw.
- ``module.sharding_units``: the repeated block types, for FSDP2 / auto-wrap.
"""

from zoo.callbacks.compression import (
    MagnitudePruning,
    Quantization,
    StructuredPruning,
    WeightSharing,
    load_compressed,
)
from zoo.callbacks.distillation import (
    Distillation,
    FeatureProjector,
    SelfDistillation,
    distillation_loss,
    load_teacher,
)
from zoo.callbacks.ema import EMA, ema_decay
from zoo.callbacks.monitoring import TrainingMonitor
from zoo.callbacks.throughput import ThroughputMonitor

__all__ = [
    "EMA",
    "Distillation",
    "FeatureProjector",
    "MagnitudePruning",
    "Quantization",
    "SelfDistillation",
    "StructuredPruning",
    "ThroughputMonitor",
    "TrainingMonitor",
    "WeightSharing",
    "distillation_loss",
    "ema_decay",
    "load_compressed",
    "load_teacher",
]
