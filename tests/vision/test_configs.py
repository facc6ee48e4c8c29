"""The vision configs: deit_tiny.yaml is complete, the others overlay it; data values reach the model."""

from __future__ import annotations

import pytest
import yaml

from zoo.cli import ZooCLI
from zoo.vision import ImageClassifier, VisualPromptTuning

from ..conftest import CONFIGS

VISION = CONFIGS / "vision"
BASE = VISION / "deit_tiny.yaml"
OVERLAYS = sorted(p for p in VISION.glob("*.yaml") if p != BASE)


def build(config) -> ZooCLI:
    return ZooCLI(args=["--config", str(config)], run=False)


def test_the_default_config_is_complete_and_every_other_extends_it():
    assert "extends" not in yaml.safe_load(BASE.read_text())
    assert all(yaml.safe_load(p.read_text())["extends"] == BASE.name for p in OVERLAYS)


@pytest.mark.parametrize("config", [BASE, *OVERLAYS], ids=lambda p: p.stem)
def test_class_names_and_image_side_come_from_the_data(config):
    cli = build(config)
    assert cli.model.hparams.class_names == cli.datamodule.class_names
    assert cli.model.hparams.img_size == cli.datamodule.img_size == 32
    assert cli.model.num_classes == cli.datamodule.num_classes == 12
    assert cli.trainer.checkpoint_callback.monitor == "val/acc"


def test_an_overlay_changing_the_model_class_keeps_none_of_the_base_arguments_it_does_not_take():
    cli = build(VISION / "vpt_deep.yaml")
    assert isinstance(cli.model, VisualPromptTuning) and "stem" not in cli.model.hparams
    assert cli.model.hparams.model_name == "vit_tiny_patch16_224" and cli.model.hparams.deep
    assert cli.config.model.init_args.optimizer.class_path == "torch.optim.SGD"
    assert cli.config.model.init_args.optimizer.init_args.weight_decay == 0.0001


def test_an_overlay_keeps_the_base_settings_it_does_not_name():
    cli = build(VISION / "vit_tiny.yaml")
    assert isinstance(cli.model, ImageClassifier) and cli.model.hparams.stem == "patch"
    assert cli.config.model.init_args.optimizer.init_args.weight_decay == 0.05
    assert cli.config.trainer.max_epochs == 10 and cli.config.data.init_args.batch_size == 64
