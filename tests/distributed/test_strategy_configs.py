"""Every YAML in ``configs/strategy`` parses with a model config, builds its strategy, and (FSDP/DeepSpeed)
resolves the model's ``sharding_units``; DeepSpeed's own config class accepts the dict.

Lightning sets FSDP and DeepSpeed up only on CUDA, so on CPU the trainer is built with ``accelerator=cpu``,
``devices=1``: the strategy object and its options are exactly the YAML's. The ``gpu`` tests run them for real.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy
from torch.distributed.fsdp import BackwardPrefetch, ShardingStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from tests.conftest import CONFIGS
from zoo.cli import ZooCLI
from zoo.protein import ESM2Layer
from zoo.strategies import ShardingUnitsDeepSpeed, ShardingUnitsFSDP, apply_activation_checkpointing

STRATEGY_FILES = sorted((CONFIGS / "strategy").glob("*.yaml"))
MODELS = {"vision/vit_tiny.yaml": "ImageClassifier", "protein/esm2_t6_8M.yaml": "ESM2MaskedLM"}


def build(model_config: str, strategy_file, tmp_path, *extra: str) -> ZooCLI:
    args = ["--config", str(CONFIGS / model_config), "--config", str(strategy_file)]
    args += [
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.num_nodes=1",
        "--trainer.logger=false",
    ]
    args += [f"--trainer.default_root_dir={tmp_path}", *extra]
    return ZooCLI(args=args, run=False)


def test_every_strategy_file_is_tested():
    assert {f.stem for f in STRATEGY_FILES} == {
        "ddp",
        "fsdp2",
        "fsdp",
        "fsdp_grad_op",
        "fsdp_hybrid",
        "deepspeed_zero2",
        "deepspeed_zero3",
    }


@pytest.mark.parametrize("model_config", sorted(MODELS))
@pytest.mark.parametrize("strategy_file", STRATEGY_FILES, ids=lambda f: f.stem)
def test_strategy_config_builds_with_model(strategy_file, model_config, tmp_path):
    cli = build(model_config, strategy_file, tmp_path)
    strategy, model = cli.trainer.strategy, cli.model
    assert type(model).__name__ == MODELS[model_config]
    units = set(model.sharding_units)
    assert units, "every zoo model declares its sharding units"
    if isinstance(strategy, ShardingUnitsFSDP):
        strategy.resolve_sharding_units(model)
        policy = strategy.kwargs["auto_wrap_policy"]
        assert isinstance(policy, ModuleWrapPolicy) and set(policy._module_classes) == units
        assert strategy.kwargs["backward_prefetch"] is BackwardPrefetch.BACKWARD_PRE
        if strategy.activation_checkpointing:
            assert set(strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes) == units
    elif isinstance(strategy, DeepSpeedStrategy):
        assert isinstance(strategy, ShardingUnitsDeepSpeed)
    elif strategy_file.stem == "fsdp2":
        assert isinstance(strategy, ModelParallelStrategy)
    else:
        assert isinstance(strategy, DDPStrategy)


def test_fsdp_variants_select_their_sharding(tmp_path):
    expected = {
        "fsdp": ShardingStrategy.FULL_SHARD,
        "fsdp_grad_op": ShardingStrategy.SHARD_GRAD_OP,
        "fsdp_hybrid": ShardingStrategy.HYBRID_SHARD,
    }
    for stem, sharding in expected.items():
        strategy = build(
            "vision/vit_tiny.yaml", CONFIGS / "strategy" / f"{stem}.yaml", tmp_path
        ).trainer.strategy
        assert strategy.sharding_strategy is sharding, stem
    hybrid = build(
        "vision/vit_tiny.yaml", CONFIGS / "strategy" / "fsdp_hybrid.yaml", tmp_path
    ).trainer.strategy
    assert hybrid.kwargs["device_mesh"] == (4, 8)
    overridden = build(
        "vision/vit_tiny.yaml",
        CONFIGS / "strategy" / "fsdp.yaml",
        tmp_path,
        "--trainer.strategy.init_args.cpu_offload=true",
        "--trainer.strategy.init_args.backward_prefetch=BACKWARD_POST",
    ).trainer.strategy
    assert overridden.cpu_offload.offload_params
    assert overridden.kwargs["backward_prefetch"] is BackwardPrefetch.BACKWARD_POST


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_config_accepted_by_deepspeed(stage, tmp_path):
    deepspeed_config = pytest.importorskip("deepspeed.runtime.config")
    strategy = build(
        "protein/esm2_t6_8M.yaml", CONFIGS / "strategy" / f"deepspeed_zero{stage}.yaml", tmp_path
    ).trainer.strategy
    config = dict(strategy.config)
    config["train_micro_batch_size_per_gpu"] = 1  # Lightning fills it from the dataloader at setup
    parsed = deepspeed_config.DeepSpeedConfig(config)
    assert parsed.zero_config.stage == stage
    assert parsed.zero_config.offload_optimizer.device == "cpu"
    if stage == 3:
        assert parsed.zero_config.offload_param.device == "cpu"
    else:
        assert parsed.zero_config.offload_param is None
    with pytest.raises(Exception, match="offload_parm"):  # DeepSpeed rejects what it does not know
        deepspeed_config.DeepSpeedConfig({**config, "zero_optimization": {"stage": 3, "offload_parm": {}}})


def test_missing_sharding_units_is_a_clear_error():
    strategy = ShardingUnitsFSDP()
    with pytest.raises(ValueError, match="Linear declares no `sharding_units`"):
        strategy.resolve_sharding_units(torch.nn.Linear(2, 2))


def test_activation_checkpointing_keeps_outputs_and_gradients():
    from zoo.protein import ESM2MaskedLM

    torch.manual_seed(0)
    plain = ESM2MaskedLM(model_kwargs={"num_layers": 2, "embed_dim": 32, "attention_heads": 4})
    checkpointed = ESM2MaskedLM(model_kwargs={"num_layers": 2, "embed_dim": 32, "attention_heads": 4})
    checkpointed.load_state_dict(plain.state_dict())
    assert apply_activation_checkpointing(checkpointed, (ESM2Layer,)) == 2
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()  # checkpoints stay loadable
    tokens = torch.randint(4, 24, (2, 12))
    for model in (plain, checkpointed):
        model(tokens).square().mean().backward()
    torch.testing.assert_close(checkpointed(tokens), plain(tokens))
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, msg=name)
