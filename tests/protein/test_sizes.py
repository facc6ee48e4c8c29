"""The published ESM-2 sizes: presets in code and configs/protein/sizes/*.yaml, built on the meta device.

These configs are GPU-cluster recipes (up to 15B parameters), so tests/test_cli.py does not run them;
here each one is built exactly as ``zoo fit`` would build it, without memory, and checked against the
published architecture and exact parameter count.
"""

from __future__ import annotations

import pytest
import torch
import yaml

from tests.conftest import CONFIGS
from zoo.protein import ESM2, ESM2_CONFIGS
from zoo.registry import measure_parameters

# name: (layers, width, heads, exact parameters of fair-esm's model)
PUBLISHED = {
    "t6_8M": (6, 320, 20, 7_512_474),
    "t12_35M": (12, 480, 20, 33_501_394),
    "t30_150M": (30, 640, 20, 148_140_154),
    "t33_650M": (33, 1280, 20, 651_043_254),
    "t36_3B": (36, 2560, 40, 2_839_005_634),
    "t48_15B": (48, 5120, 40, 15_129_100_194),
}


@pytest.mark.parametrize("size", PUBLISHED)
def test_size_config_builds_the_published_architecture(size):
    layers, width, heads, parameters = PUBLISHED[size]
    preset = ESM2_CONFIGS[size]
    assert (preset.num_layers, preset.embed_dim, preset.attention_heads) == (layers, width, heads)
    relative = f"protein/sizes/esm2_{size}_UR50D.yaml"
    config = yaml.safe_load((CONFIGS / relative).read_text())
    assert config["model"]["init_args"]["size"] == size
    assert measure_parameters(relative) == parameters


def test_from_config_on_meta_device():
    with torch.device("meta"):
        model = ESM2.from_config("esm2_t48_15B_UR50D")
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED["t48_15B"][3]
    with pytest.raises(ValueError, match="unknown ESM-2 size"):
        ESM2.from_config("t99_1T")
