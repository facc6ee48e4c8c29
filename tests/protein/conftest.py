"""Fixtures for the ESM-2 tests."""

from __future__ import annotations

import pytest
import torch

from tests.protein.helpers import SEQUENCES
from zoo.protein import Alphabet


@pytest.fixture(scope="session")
def tokens() -> torch.Tensor:
    """A padded batch of unequal lengths containing <mask> tokens."""
    return Alphabet().get_batch_converter()(SEQUENCES)[2]
