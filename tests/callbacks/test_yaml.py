"""The callbacks build from YAML through the ``zoo`` CLI, as users write them."""

from __future__ import annotations

from pathlib import Path

from zoo.callbacks import EMA, Distillation, TrainingMonitor
from zoo.cli import ZooCLI

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

CALLBACKS = """
trainer:
  callbacks:
    - class_path: zoo.callbacks.EMA
      init_args: {decay: 0.999, warmup: true, start_step: 10, update_every_n_steps: 2}
    - class_path: zoo.callbacks.Distillation
      init_args:
        teacher: zoo.vision.ImageClassifier
        teacher_init_args: {model_name: vit_tiny_patch16_224, patch_size: 8, model_kwargs: {depth: 1}}
        mode: deit
    - class_path: zoo.callbacks.TrainingMonitor
      init_args: {action: skip_step, log_every_n_steps: 20}
"""


def test_callbacks_from_yaml(tmp_path):
    fragment = tmp_path / "callbacks.yaml"
    fragment.write_text(CALLBACKS)
    cli = ZooCLI(
        args=["--config", str(CONFIGS / "vision" / "deit_tiny_distilled.yaml"), "--config", str(fragment)],
        run=False,
    )
    callbacks = {type(c): c for c in cli.trainer.callbacks}
    assert callbacks[EMA].warmup and callbacks[EMA].start_step == 10
    assert callbacks[Distillation].mode == "deit"
    assert callbacks[TrainingMonitor].action == "skip_step"
