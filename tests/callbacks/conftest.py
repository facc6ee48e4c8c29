"""Fixtures for the callback tests; the helpers live in ``callback_testing``."""

import pytest

from tests.callbacks.callback_testing import tiny_trainer


@pytest.fixture
def make_trainer(tmp_path):
    return lambda **kwargs: tiny_trainer(tmp_path, **kwargs)
