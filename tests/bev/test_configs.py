"""The published sizes are overlays on one recipe (configs/bev/sizes/base.yaml), built on the meta device."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from zoo.bev import NUSCENES_CLASSES
from zoo.cli import ZooCLI

from ..conftest import CONFIGS

# config -> (model_name, queue length, camera image (H, W)); the base alone is BEVFormer-tiny
SIZES = {
    "base": ("bevformer_tiny", 3, (480, 800)),
    "bevformer_tiny": ("bevformer_tiny", 3, (480, 800)),
    "bevformer_small": ("bevformer_small", 3, (736, 1280)),
    "bevformer_base": ("bevformer_base", 4, (928, 1600)),
}


@pytest.mark.parametrize("config", sorted(SIZES))
def test_each_size_is_the_recipe_with_its_own_shapes(config):
    with torch.device("meta"):
        path = CONFIGS / "bev" / "sizes" / f"{config}.yaml"
        cli = ZooCLI(args=["--config", str(path), "--trainer.logger=false"], run=False)
    model_name, queue_length, img_size = SIZES[config]
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    assert model.hparams.model_name == model_name
    assert data.hparams.queue_length == queue_length and data.img_size == img_size
    # the shared recipe
    assert model.class_names == list(NUSCENES_CLASSES)
    assert model.model.config.point_cloud_range == (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)
    assert model.hparams.backbone_lr_scale == 0.1 and model.hparams.max_detections == 300
    optimizer = cli.config.model.init_args.optimizer
    assert optimizer.class_path == "torch.optim.AdamW" and optimizer.init_args.lr == 2e-4
    assert optimizer.init_args.weight_decay == 0.01
    assert cli.config.model.init_args.lr_scheduler.init_args.warmup_steps == 500
    assert trainer.max_epochs == 24 and trainer.gradient_clip_val == 35.0 and data.hparams.batch_size == 1
    checkpoints = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert [(c.monitor, c.mode) for c in checkpoints] == [("val/NDS", "max")]  # last.ckpt: zoo fit adds it
