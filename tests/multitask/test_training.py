"""Lightning integration: every weighting trains and logs per task, resume is exact, YAML declares tasks,
predictions are records, old checkpoints upgrade."""

from __future__ import annotations

from dataclasses import asdict

import lightning as L
import pytest
import torch

from zoo.cli import ZooCLI
from zoo.datamodules.multitask import ARITHMETIC_TASKS, MultitaskDataModule
from zoo.multitask import (
    DynamicWeightAverage,
    GradNorm,
    LossTrend,
    MultitaskModule,
    UncertaintyWeighting,
)
from zoo.multitask.arithmetic import ROLE_TAGS
from zoo.multitask.module import sequences_match
from zoo.multitask.vocab import EOS_ID, PAD_ID

from ..conftest import CONFIGS

WEIGHTINGS = {
    "static": lambda: None,
    "uncertainty": UncertaintyWeighting,
    "dwa": DynamicWeightAverage,
    "gradnorm": GradNorm,
    "loss_trend": lambda: LossTrend(patience=1),
}


def data(mode: str = "max_size_cycle", **kwargs) -> MultitaskDataModule:
    return MultitaskDataModule(mode=mode, train_size=64, val_size=16, test_size=16, batch_size=32, **kwargs)


def module(dm: MultitaskDataModule, weighting=None, **kwargs) -> MultitaskModule:
    return MultitaskModule(
        dm.vocab_size,
        dm.tasks,
        model_name="multitask_tiny",
        weighting=weighting,
        vocab_tokens=dm.vocab_tokens,
        tokenizer=dm.tokenizer,
        **kwargs,
    )


def trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = {
        "max_epochs": 3,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
    }
    return L.Trainer(**{**defaults, **kwargs})


@pytest.mark.parametrize("method", list(WEIGHTINGS))
def test_every_weighting_trains_and_logs_per_task(method, tmp_path):
    L.seed_everything(0)
    dm = data()
    model = module(dm, WEIGHTINGS[method]())
    before = model.weighting.coefficients().detach().clone()
    run = trainer(tmp_path)
    run.fit(model, dm)
    logged = run.callback_metrics
    for task in ("wellformed", "roles", "value"):
        assert f"train/{task}/loss" in logged and f"train/{task}/weight" in logged
    assert {
        "val/wellformed/acc",
        "val/roles/token_acc",
        "val/value/token_acc",
        "val/value/exact_match",
    } <= set(logged)
    assert 0.0 <= float(logged["val/score"]) <= 1.0
    after = model.weighting.coefficients().detach()
    if method == "static":
        assert torch.equal(before, after)
    elif method != "loss_trend":  # the trend rule only moves once a loss stalls
        assert not torch.allclose(before, after), f"{method} weights never moved"
    if method == "gradnorm":
        assert after.sum().item() == pytest.approx(3.0, rel=1e-5)
    run.save_checkpoint(tmp_path / "trained.ckpt")
    reloaded = MultitaskModule.load_from_checkpoint(tmp_path / "trained.ckpt", weights_only=True)
    assert type(reloaded.weighting) is type(model.weighting)  # recorded apart from the hyper-parameters
    assert reloaded.weighting.weights() == pytest.approx(model.weighting.weights())


class RecordBatches(L.Callback):
    def __init__(self) -> None:
        self.epochs: list[list[tuple[str, int]]] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.epochs.append([])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        (task, b), *_ = batch.items()
        self.epochs[-1].append((task, int(b["input_ids"].sum())))


def test_task_sampler_mode_trains_one_task_per_step(tmp_path):
    L.seed_everything(0)
    dm = data("round_robin")
    model = module(dm, UncertaintyWeighting())
    batches = RecordBatches()
    run = trainer(tmp_path, max_epochs=2, callbacks=[batches])
    run.fit(model, dm)
    assert run.global_step == 12  # 2 batches of each of 3 tasks, twice
    assert (model.weighting.log_variances != 0).all()  # every task's log-variance was trained
    first, second = batches.epochs
    assert [task for task, _ in first] == [task for task, _ in second] == ["wellformed", "roles", "value"] * 2
    assert first != second  # Lightning's set_epoch reached the plan: new batches in the second epoch


class StopAfterEpoch(L.Callback):
    """Stops a 4-epoch run after ``epoch`` epochs, so its LR schedule is the full run's."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 == self.epochs:
            trainer.should_stop = True


def test_resumed_run_continues_exactly(tmp_path):
    def fit(ckpt=None, stop=None):
        L.seed_everything(0)
        dm = data()
        model = module(dm, DynamicWeightAverage())
        run = trainer(
            tmp_path, max_epochs=4, limit_val_batches=0, callbacks=[StopAfterEpoch(stop)] if stop else []
        )
        run.fit(model, dm, ckpt_path=ckpt)
        if stop:
            run.save_checkpoint(tmp_path / "stopped.ckpt")
        return model

    straight = fit()
    fit(stop=2)
    resumed = fit(ckpt=str(tmp_path / "stopped.ckpt"))
    assert int(resumed.weighting.epochs_seen) == 4
    torch.testing.assert_close(resumed.weighting.current, straight.weighting.current)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_sequences_match_compares_up_to_the_first_eos():
    generated = torch.tensor([[5, 6, EOS_ID, PAD_ID], [5, 6, 7, EOS_ID], [5, EOS_ID, 9, 9]])
    target = torch.tensor([[5, 6, EOS_ID], [5, 6, EOS_ID], [5, EOS_ID, PAD_ID]])
    assert sequences_match(generated, target).tolist() == [True, False, True]


def test_tasks_declared_in_yaml_reach_the_model():
    tasks = (
        '[{"name": "roles", "type": "token_classification", "num_classes": 7, "loss_weight": 2.5},'
        ' {"name": "value", "type": "generation", "max_target_length": 8}]'
    )
    cli = ZooCLI(
        args=[
            "--config",
            str(CONFIGS / "multitask" / "arithmetic.yaml"),
            f"--data.init_args.tasks={tasks}",
            "--data.init_args.task_batch_sizes={roles: 16}",
            "--model.init_args.weighting=UncertaintyWeighting",
            "--trainer.logger=false",
        ],
        run=False,
    )
    assert list(cli.model.tasks) == ["roles", "value"]
    assert cli.model.weighting.weights()["roles"] == pytest.approx(2.5)
    assert isinstance(cli.model.weighting, UncertaintyWeighting)
    assert cli.datamodule.hparams.task_batch_sizes == {"roles": 16}
    assert cli.model.hparams.vocab_size == cli.datamodule.vocab_size == 19
    assert cli.model.hparams.vocab_tokens == cli.datamodule.vocab_tokens


def test_weighting_configs_are_the_base_config_with_another_weighting():
    def resolved(name: str):
        cli = ZooCLI(
            args=["--config", str(CONFIGS / "multitask" / f"{name}.yaml"), "--trainer.logger=false"],
            run=False,
        )
        config = cli.config.as_dict()
        weighting = config["model"]["init_args"].pop("weighting")
        for key in ("config", "extends"):  # the files read
            config.pop(key)
        return config, weighting, cli.model

    base, static, base_model = resolved("arithmetic")
    assert static["class_path"].endswith("StaticWeighting")
    assert base_model.hparams.model_kwargs == {"num_kv_heads": 2}
    assert sum(p.numel() for p in base_model.parameters()) == 1_577_244
    expected = {
        "arithmetic_dwa": ("DynamicWeightAverage", {"temperature": 2.0}),
        "arithmetic_gradnorm": ("GradNorm", {"alpha": 1.5, "lr": 0.025}),
        "arithmetic_loss_trend": (
            "LossTrend",
            {"patience": 2, "tolerance": 0.01, "boost": 1.5, "max_weight": 3.0},
        ),
        "arithmetic_uncertainty": ("UncertaintyWeighting", {"init_log_variance": 0.0}),
    }
    for name, (method, arguments) in expected.items():
        config, weighting, model = resolved(name)
        assert config == base, name
        assert (
            weighting["class_path"].endswith(method) and arguments.items() <= weighting["init_args"].items()
        )
        assert type(model.weighting).__name__ == method


def test_test_metrics_and_predict_records(tmp_path):
    L.seed_everything(0)
    dm = data(tasks=[*ARITHMETIC_TASKS.values()])
    model = module(dm)
    run = trainer(tmp_path, max_epochs=1)
    run.fit(model, dm)
    tested = run.test(model, dm, verbose=False)[0]
    assert {
        "test/wellformed/acc",
        "test/roles/token_acc",
        "test/value/exact_match",
        "test/value_regression/mae",
        "test/score",
    } <= set(tested)
    records = [record for batch in run.predict(model, dm) for record in batch]
    assert len(records) == len(dm.predict_set) > 16
    for record in records:
        assert list(record) == ["id", "expression", "wellformed", "roles", "value", "value_regression"]
        assert record["id"] == record["expression"]
        assert record["wellformed"] in ("yes", "no")
        assert len(record["roles"]) == len(record["expression"]) and set(record["roles"]) <= set(ROLE_TAGS)
        assert isinstance(record["value"], str)  # decoded: an untrained model may well write "<unk>"
        assert isinstance(record["value_regression"], float)


def test_predict_records_for_a_file_of_expressions(tmp_path):
    path = tmp_path / "expressions.txt"
    path.write_text("3+4*2\n(1+2)*3\n")
    dm = data(predict_path=str(path))
    model = module(dm)
    records = [record for batch in trainer(tmp_path).predict(model, dm) for record in batch]
    assert [r["id"] for r in records] == ["3+4*2", "(1+2)*3"]
    assert [len(r["roles"]) for r in records] == [5, 7]
    bare = MultitaskModule(dm.vocab_size, dm.tasks, model_name="multitask_tiny")  # no vocabulary: ids
    records = [record for batch in trainer(tmp_path).predict(bare, dm) for record in batch]
    assert all(isinstance(r["value"], list) and EOS_ID not in r["value"] for r in records)


@pytest.mark.parametrize("first", ["wellformed", "value"])
def test_example_inputs_run_through_forward(first):
    tasks = sorted(ARITHMETIC_TASKS.values(), key=lambda spec: spec.name != first)
    model = MultitaskModule(tasks=tasks, model_name="multitask_tiny").eval()
    inputs = model.example_inputs(batch_size=3)
    assert inputs[2] == first and len(inputs) == (4 if first == "value" else 3)
    output = model(*inputs)
    assert output.shape[0] == 3 and torch.isfinite(output).all()


def test_architecture_is_a_preset_with_overrides():
    model = MultitaskModule(model_kwargs={"num_kv_heads": 2, "sharing": "adapters"})
    assert model.model.d_model == 128 and model.model.sharing == "adapters"
    assert model.model.shared[0].attn.num_kv_heads == 2
    with pytest.raises(
        ValueError, match="unknown model_name 'multitask_huge'; expected one of multitask_small"
    ):
        MultitaskModule(model_name="multitask_huge")
    with pytest.raises(ValueError, match=r"model_kwargs \['width'\] are not MultitaskTransformer arguments"):
        MultitaskModule(model_kwargs={"width": 64})
    with pytest.raises(ValueError, match="vocab_tokens must hold vocab_size=19 tokens"):
        MultitaskModule(vocab_tokens=["<pad>", "<bos>", "<eos>", "<unk>", "1"])
    clash = [ARITHMETIC_TASKS["value"], {"name": "value_generated", "type": "regression"}]
    with pytest.raises(ValueError, match="task 'value_generated' clashes with the metric group"):
        MultitaskModule(tasks=clash)


def test_an_old_checkpoint_loads_once_upgraded(tmp_path):
    """Checkpoints written when every architecture argument was a hyper-parameter of its own."""
    dm = data()
    model = module(dm, model_kwargs={"num_kv_heads": 1})
    old_hparams = {
        "vocab_size": dm.vocab_size,
        "d_model": 32,
        "num_heads": 2,
        "num_kv_heads": 1,
        "ffn_dim": None,
        "num_layers": 1,
        "sharing": "partial",
        "task_layers": None,
        "adapter_dim": 32,
        "positions": "rotary",
        "decoder_layers": 1,
        "dropout": 0.0,
        "num_beams": 1,
        "tasks": [{k: v for k, v in asdict(t).items() if k != "label_names"} for t in dm.tasks],
    }
    old = {
        "state_dict": model.state_dict(),
        "hyper_parameters": old_hparams,
        "pytorch-lightning_version": "2.6.0",
    }
    upgraded = MultitaskModule.upgrade_checkpoint(old)
    assert upgraded["hyper_parameters"]["model_name"] == "multitask_small"
    assert upgraded["hyper_parameters"]["model_kwargs"] == {
        "d_model": 32, "num_heads": 2, "num_kv_heads": 1, "num_layers": 1, "decoder_layers": 1
    }  # fmt: skip
    assert MultitaskModule.upgrade_checkpoint(upgraded) == upgraded
    torch.save(upgraded, tmp_path / "upgraded.ckpt")
    torch.save(old, tmp_path / "old.ckpt")
    for name in ("upgraded.ckpt", "old.ckpt"):  # the old file loads directly too
        loaded = MultitaskModule.load_from_checkpoint(tmp_path / name, weights_only=True)
        for (key, value), reloaded in zip(model.state_dict().items(), loaded.state_dict().values()):
            torch.testing.assert_close(reloaded, value, msg=key)
        assert list(loaded.state_dict()) == list(model.state_dict())
