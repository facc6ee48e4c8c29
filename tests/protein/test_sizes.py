"""The published ESM-2 sizes: presets in code and configs/protein/sizes/*.yaml, built on the meta device.

These configs are GPU-cluster recipes (up to 15B parameters), so tests/test_cli.py does not run them;
here each one is built exactly as ``zoo fit`` would build it (its ``extends: base.yaml`` included),
without memory, and checked against the published architecture and exact parameter count.
"""

from __future__ import annotations

import pytest
import torch
import yaml

from tests.conftest import CONFIGS
from zoo.cli import ZooCLI
from zoo.protein import ESM2, ESM2_CONFIGS, esm2_config
from zoo.registry import measure_parameters

# name: (layers, width, heads, exact parameters of fair-esm's model)
PUBLISHED = {
    "esm2_t6_8M": (6, 320, 20, 7_512_474),
    "esm2_t12_35M": (12, 480, 20, 33_501_394),
    "esm2_t30_150M": (30, 640, 20, 148_140_154),
    "esm2_t33_650M": (33, 1280, 20, 651_043_254),
    "esm2_t36_3B": (36, 2560, 40, 2_839_005_634),
    "esm2_t48_15B": (48, 5120, 40, 15_129_100_194),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_size_config_builds_the_published_architecture(name):
    layers, width, heads, parameters = PUBLISHED[name]
    preset = ESM2_CONFIGS[name]
    assert (preset.num_layers, preset.embed_dim, preset.attention_heads) == (layers, width, heads)
    relative = f"protein/sizes/{name}_UR50D.yaml"
    config = yaml.safe_load((CONFIGS / relative).read_text())
    assert config["extends"] == "base.yaml" and config["model"]["init_args"]["model_name"] == name
    assert measure_parameters(relative) == parameters


def test_size_configs_share_the_recipe_of_their_base():
    with torch.device("meta"):
        cli = ZooCLI(
            args=["--config", str(CONFIGS / "protein" / "sizes" / "esm2_t36_3B_UR50D.yaml")],
            run=False,
            save_config_callback=None,
        )
    assert cli.model.hparams.model_name == "esm2_t36_3B" and cli.model.hparams.mask_prob == 0.15
    scheduler = cli.config.model.init_args.lr_scheduler.init_args
    assert (scheduler.warmup_steps, scheduler.min_lr_ratio) == (20000, 0.1)  # the overlay's, the base's
    assert cli.trainer.max_steps == 500_000 and cli.trainer.accumulate_grad_batches == 8
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    assert names.count("ModelCheckpoint") == 1


def test_from_config_on_meta_device():
    with torch.device("meta"):
        model = ESM2.from_config("esm2_t48_15B_UR50D")
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED["esm2_t48_15B"][3]
    with pytest.raises(ValueError, match="unknown ESM-2 size"):
        ESM2.from_config("t99_1T")


def test_preset_spellings_and_overrides():
    assert esm2_config("t33_650M") == esm2_config("esm2_t33_650M_UR50D") == ESM2_CONFIGS["esm2_t33_650M"]
    tiny = esm2_config("esm2_t6_8M", {"num_layers": 2, "embed_dim": 32, "attention_heads": 2})
    assert (tiny.num_layers, tiny.embed_dim, tiny.attention_heads, tiny.token_dropout) == (2, 32, 2, True)
    assert ESM2.from_config("esm2_t6_8M", num_layers=1, embed_dim=16, attention_heads=2).num_layers == 1
    with pytest.raises(ValueError, match=r"unknown ESM-2 model_kwargs \['layers'\]"):
        esm2_config("esm2_t6_8M", {"layers": 2})
