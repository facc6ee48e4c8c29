"""Shared fixtures: tiny models and data so the fast suite stays fast on a 2-core CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def tiny_image_data():
    """A few batches of the embedded shapes."""
    from zoo.datamodules import ImageClassificationDataModule

    return ImageClassificationDataModule(train_size=64, val_size=32, test_size=32, batch_size=16)


@pytest.fixture
def tiny_deit_kwargs() -> dict:
    """DeiT-Ti width, 2 blocks, 8 px tokens on 32 px images."""
    return {"model_name": "deit_tiny_patch16_224", "patch_size": 8, "model_kwargs": {"depth": 2}}
