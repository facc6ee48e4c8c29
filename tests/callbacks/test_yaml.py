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


def test_distilled_config_recipe_with_a_cli_trained_teacher(tmp_path):
    """The recipe in deit_tiny_distilled.yaml's header: train a teacher with the CLI, then pass its checkpoint."""
    tiny = [
        "--data.init_args.train_size=32",
        "--data.init_args.val_size=16",
        "--data.init_args.test_size=16",
        "--data.init_args.batch_size=16",
        "--model.init_args.model_kwargs={depth: 1, embed_dim: 48, num_heads: 2}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    ZooCLI(
        args=[
            "fit",
            "--config",
            str(CONFIGS / "vision" / "deit_tiny.yaml"),
            *tiny,
            "--trainer.max_steps=1",
            f"--trainer.default_root_dir={tmp_path / 'teacher'}",
        ]
    )
    (teacher_checkpoint,) = (tmp_path / "teacher").rglob("last.ckpt")
    cli = ZooCLI(
        args=[
            "fit",
            "--config",
            str(CONFIGS / "vision" / "deit_tiny_distilled.yaml"),
            *tiny,
            "--trainer.callbacks+=zoo.callbacks.Distillation",
            f"--trainer.callbacks.teacher_checkpoint={teacher_checkpoint}",
            "--trainer.callbacks.mode=deit",
            "--trainer.callbacks.feature_layers={model.blocks.0: model.blocks.0}",
            "--trainer.fast_dev_run=true",
            f"--trainer.default_root_dir={tmp_path / 'student'}",
        ]
    )
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, Distillation)]
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    assert callback.teacher.hparams.model_name == "deit_tiny_patch16_224"
    assert cli.model.hparams.model_name == "deit_tiny_distilled_patch16_224"
    assert cli.trainer.callback_metrics["train/distill_loss"] > 0
    assert cli.trainer.callback_metrics["train/feature_loss"] > 0
