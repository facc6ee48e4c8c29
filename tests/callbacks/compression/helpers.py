"""Tiny models and a save/reload round trip for the compression tests (random weights, CPU, seconds)."""

from __future__ import annotations

import io

import torch

from zoo.callbacks.compression import load_compressed
from zoo.callbacks.compression.records import CHECKPOINT_KEY, records_of
from zoo.vision import ImageClassifier

TINY_DEIT = {"model_name": "deit_tiny_patch16_224", "patch_size": 8, "model_kwargs": {"depth": 2}}


def tiny_deit(depth: int = 2, seed: int = 0, **model_kwargs) -> ImageClassifier:
    torch.manual_seed(seed)
    return ImageClassifier(**{**TINY_DEIT, "model_kwargs": {"depth": depth, **model_kwargs}}).eval()


NARROW = {"depth": 1, "embed_dim": 64, "num_heads": 2}  # for the column-by-column GPTQ loop


def images(n: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def round_trip(module: torch.nn.Module, fresh: torch.nn.Module) -> torch.nn.Module:
    """Save like a Lightning checkpoint (state dict + records), load ``weights_only`` into a fresh model."""
    buffer = io.BytesIO()
    torch.save({"state_dict": module.state_dict(), CHECKPOINT_KEY: records_of(module)}, buffer)
    buffer.seek(0)
    return load_compressed(fresh, torch.load(buffer, weights_only=True)).eval()
