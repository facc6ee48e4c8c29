"""Tiny multitask models and data: the fast tests of this family stay within seconds each."""

from __future__ import annotations

import pytest
import torch

from zoo.multitask import TaskSpec

TASKS = [
    TaskSpec("cls", "sequence_classification", num_classes=3),
    TaskSpec("tag", "token_classification", num_classes=5),
    TaskSpec("reg", "regression", num_classes=2),
    TaskSpec("gen", "generation", max_target_length=12),
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and a shared CPU does not make OpenMP threads spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tasks() -> list[TaskSpec]:
    return list(TASKS)


@pytest.fixture
def tiny_model_kwargs() -> dict:
    return {"d_model": 32, "num_heads": 4, "num_kv_heads": 2, "num_layers": 2, "decoder_layers": 2}
