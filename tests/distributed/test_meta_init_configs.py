"""Every model config composed with configs/strategy/fsdp2.yaml builds its parameters on the meta device and
trains: ``ZooModule.configure_model`` materialises and shards each of the model's ``sharding_units``, then the
rest, and one optimizer step and a validation run follow.

One process (``data_parallel_size=1``, in this process): what is checked is the model side of meta-device
init (every parameter built, initialised, sharded; each step's FSDP2 gathers reaching every parameter it
reads), which one rank exercises as fully as two. ``test_meta_init.py`` and ``test_data_parallel.py`` run
two processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
import torch.distributed as dist

from tests.conftest import CONFIGS, TINY_BEV_ARGS
from tests.diffusion.conftest import TINY_AE, TINY_DIT, TINY_UNET
from zoo.cli import ZooCLI
from zoo.strategies import empty_parameters

ONE_PROCESS = [
    "--config",
    str(CONFIGS / "strategy" / "fsdp2.yaml"),
    "--trainer.strategy.init_args.data_parallel_size=1",
    "--trainer.devices=1",
    "--trainer.max_steps=1",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=1",
    "--trainer.limit_val_batches=1",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


@dataclass
class Config:
    path: str
    val_metric: str
    options: list[str] = field(default_factory=list)


IMAGES = ["--data.init_args.train_size=16", "--data.init_args.val_size=8", "--data.init_args.batch_size=8"]
PROTEINS = [
    "--model.init_args.model_kwargs={num_layers: 2, embed_dim: 32, attention_heads: 2}",
    "--data.init_args.max_tokens=512",
    "--data.init_args.max_length=126",
]
LDM = [
    f"--model.init_args.autoencoder={TINY_AE}",
    "--model.init_args.conditioning.init_args.dim=16",
    "--data.init_args.img_size=16",
    *IMAGES,
]
# The autoencoder (configs/diffusion/autoencoder_*.yaml) declares no sharding units: FSDP2 has nothing to shard.
CONFIGS_UNDER_FSDP2 = {
    "vision": Config(
        "vision/vit_tiny.yaml", "val/acc", ["--model.init_args.model_kwargs={depth: 2}", *IMAGES]
    ),
    "vision-vpt": Config(
        "vision/vpt_deep.yaml", "val/acc", ["--model.init_args.model_kwargs={depth: 2}", *IMAGES]
    ),
    "protein": Config("protein/esm2_t6_8M.yaml", "val/perplexity", PROTEINS),
    "protein-finetune": Config("protein/esm2_t6_8M_membrane.yaml", "val/f1", PROTEINS),
    "multitask": Config(
        "multitask/arithmetic.yaml",
        "val/value/exact_match",
        [
            "--model.init_args.model_name=multitask_tiny",
            *IMAGES,
            "--data.init_args.task_batch_sizes={wellformed: 8, roles: 8}",
            "--trainer.limit_val_batches=3",  # one batch of each task, generation included
        ],
    ),
    "diffusion-unet": Config(
        "diffusion/ldm_unet_class.yaml",
        "val/loss",
        [*LDM, f"--model.init_args.model_kwargs={TINY_UNET}"],
    ),
    "diffusion-dit": Config(
        "diffusion/ldm_dit_class.yaml",
        "val/loss",
        [*LDM, f"--model.init_args.model_kwargs={TINY_DIT}"],
    ),
    "bev": Config(
        "bev/bevformer_cpu.yaml",
        "val/NDS",
        TINY_BEV_ARGS,
    ),
}


@pytest.fixture
def one_process_group():
    """Lightning sets up a 1-rank gloo group here: it goes when the test ends (its environment variables go
    with every test's, ``tests/conftest.py``)."""
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("name", list(CONFIGS_UNDER_FSDP2))
def test_config_builds_on_meta_and_trains_under_fsdp2(name, tmp_path, single_thread, one_process_group):
    config = CONFIGS_UNDER_FSDP2[name]
    with empty_parameters():
        cli = ZooCLI(
            args=[
                "--config",
                str(CONFIGS / config.path),
                *ONE_PROCESS,
                *config.options,
                f"--trainer.default_root_dir={tmp_path}",
            ],
            run=False,
        )
    model = cli.model
    assert all(p.is_meta for p in model.parameters()), "parameters were allocated"
    cli.trainer.fit(model, datamodule=cli.datamodule)

    assert cli.trainer.global_step == 1
    replicated = {id(p) for name in model.replicated_modules for p in model.get_submodule(name).parameters()}
    for parameter_name, parameter in model.named_parameters():
        assert not parameter.is_meta, parameter_name
        assert hasattr(parameter, "full_tensor") != (id(parameter) in replicated), parameter_name  # sharded
        full = parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter
        assert torch.isfinite(full).all(), parameter_name
    assert not any(b.is_meta for b in model.buffers())
    metrics = cli.trainer.callback_metrics
    assert math.isfinite(metrics["train/loss"]) and config.val_metric in metrics, sorted(metrics)
