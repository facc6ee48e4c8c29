"""Tiny diffusion models and data so the diffusion tests stay fast on a 2-core CPU."""

from __future__ import annotations

import pytest
import torch

TINY_AE = {
    "model_name": "kl",
    "model_kwargs": {"downsample_factor": 4, "latent_channels": 4, "base_channels": 8, "norm_num_groups": 8},
}
TINY_UNET = {
    "block_out_channels": [16, 32],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "norm_num_groups": 8,
    "attention_head_dim": 2,
}
TINY_DIT = {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16, "patch_size": 2}


@pytest.fixture
def batch() -> dict:
    from zoo.datamodules.captioned_images import CaptionedImageDataModule

    data = CaptionedImageDataModule(train_size=8, val_size=8, test_size=8, batch_size=8, img_size=16)
    data.setup()
    return data._collate([data.train_set[i] for i in range(8)])


def tiny_captions():
    """Caption conditioning of the tiny models: a one-layer text transformer of width 16."""
    from zoo.diffusion import CaptionConditioning

    return CaptionConditioning(dim=16, layers=1, heads=2)


@pytest.fixture
def tiny_ldm_kwargs() -> dict:
    from zoo.datamodules.captioned_images import shapes_caption_vocabulary
    from zoo.diffusion import ClassConditioning, SamplingConfig

    return {
        "autoencoder": dict(TINY_AE),
        "scale_factor": 1.0,
        "img_size": 16,
        "model_kwargs": dict(TINY_UNET),
        "conditioning": ClassConditioning(dim=16),
        "num_classes": 12,
        "caption_vocabulary": shapes_caption_vocabulary(),
        "sampling": SamplingConfig(steps=3),
    }


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seeded, and single-threaded: these models are so small that a second OpenMP thread only adds
    synchronisation, and on a shared, loaded machine spinning threads make each call 10-100x slower."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path, monkeypatch):
    """Trainers without a logger write into the working directory (e.g. LoRA adapters): keep it the test's."""
    monkeypatch.chdir(tmp_path)
