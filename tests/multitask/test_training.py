"""Lightning integration: every weighting trains and logs per task, resume is exact, YAML declares tasks."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from zoo.cli import ZooCLI
from zoo.datamodules.multitask import MultitaskDataModule
from zoo.multitask import DynamicWeightAverage, GradNorm, LossTrend, MultitaskModule, UncertaintyWeighting
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


def data(mode: str = "max_size_cycle") -> MultitaskDataModule:
    return MultitaskDataModule(mode=mode, train_size=64, val_size=16, test_size=16, batch_size=32)


def module(dm: MultitaskDataModule, weighting=None) -> MultitaskModule:
    return MultitaskModule(
        dm.vocab_size, dm.tasks, d_model=32, num_heads=2, num_layers=1, decoder_layers=1, weighting=weighting
    )


def trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = {
        "max_epochs": 3,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
        "use_distributed_sampler": False,
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


def test_task_sampler_mode_trains_one_task_per_step(tmp_path):
    L.seed_everything(0)
    dm = data("round_robin")
    model = module(dm, UncertaintyWeighting())
    run = trainer(tmp_path, max_epochs=1)
    run.fit(model, dm)
    assert run.global_step == 6  # 2 batches of each of 3 tasks
    assert (model.weighting.log_variances != 0).all()  # every task's log-variance was trained


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


def test_test_and_predict_run_on_every_task(tmp_path):
    L.seed_everything(0)
    dm = data()
    model = module(dm)
    run = trainer(tmp_path, max_epochs=1)
    run.fit(model, dm)
    tested = run.test(model, dm, verbose=False)[0]
    assert {"test/wellformed/acc", "test/roles/token_acc", "test/value/exact_match", "test/score"} <= set(
        tested
    )
    predictions = run.predict(model, dm)
    by_task = {task: out for batch in predictions for task, out in batch.items()}
    assert by_task["wellformed"].dtype == torch.long and by_task["wellformed"].ndim == 1
    assert by_task["roles"].ndim == 2 and by_task["value"].ndim == 2
