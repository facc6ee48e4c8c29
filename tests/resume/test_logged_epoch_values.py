"""``self.log(..., on_epoch=True)`` in training: a run resumed mid-epoch logs the epoch's value over every batch of
the epoch, the ones before the checkpoint included (``zoo.base`` checkpoints Lightning's running aggregates)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger

from zoo.base import ZooModule
from zoo.resume import ResumableDataLoader, ResumeCheckpoint, ResumeState, find_last_checkpoint


class Regression(ZooModule):
    """A linear fit logging its loss per step and per epoch (mean), and a per-epoch sum and maximum."""

    def __init__(self) -> None:
        super().__init__(optimizer=lambda params: torch.optim.SGD(params, lr=0.1), lr_scheduler=None)

    def configure_models(self) -> None:
        self.model = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch[:, :3], batch[:, 3:]
        loss = torch.nn.functional.mse_loss(self.model(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=len(batch))
        self.log("train/samples", float(len(batch)), on_step=False, on_epoch=True, reduce_fx="sum")
        self.log("train/worst", loss, on_step=False, on_epoch=True, reduce_fx="max")
        return loss

    def train_dataloader(self):
        data = torch.randn(60, 4, generator=torch.Generator().manual_seed(0))
        return ResumableDataLoader(data, batch_size=6, shuffle=True, seed=0)  # 10 batches an epoch


class Rows(Logger):
    """Keeps every logged row in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    name, version = "rows", 0

    @property
    def experiment(self):
        return None

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def epoch_values(self) -> list[dict[str, float]]:
        return [m for _, m in self.rows if "train/loss_epoch" in m]


class Crash(Callback):
    """Fails the run after optimizer step ``step``: last.ckpt is then the one of the step before it."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("killed")


def fit(root, logger: Logger, *callbacks: Callback, ckpt_path=None) -> None:
    L.seed_everything(0)
    trainer = L.Trainer(
        max_epochs=2,
        logger=logger,
        log_every_n_steps=1,
        default_root_dir=root,
        callbacks=[ResumeCheckpoint(every_n_train_steps=4), ResumeState(), *callbacks],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Regression(), ckpt_path=ckpt_path)


def test_a_run_resumed_mid_epoch_logs_the_whole_epochs_mean_sum_and_max(tmp_path):
    full = Rows()
    fit(tmp_path / "full", full)
    with pytest.raises(RuntimeError, match="killed"):
        fit(tmp_path / "killed", Rows(), Crash(step=15))
    saved = find_last_checkpoint(tmp_path / "killed")
    assert torch.load(saved, weights_only=True)["global_step"] == 12  # mid-epoch 2: batch 2 of 10
    resumed = Rows()
    fit(tmp_path / "killed", resumed, ckpt_path=saved)
    (expected,) = full.epoch_values()[1:]  # epoch 2's; the resumed run ran part of it
    (got,) = resumed.epoch_values()
    assert got == expected  # bit for bit: the aggregates go on from the checkpoint's
    assert got["train/samples"] == 60.0
    steps = [m["train/loss_step"] for _, m in resumed.rows if "train/loss_step" in m]
    assert steps == [m["train/loss_step"] for _, m in full.rows if "train/loss_step" in m][12:]
