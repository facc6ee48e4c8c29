"""``zoo.callbacks.TrainingMonitor``: each anomaly is provoked, detected, named and acted on."""

from __future__ import annotations

import copy
import json
import random

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger
from torch import nn

import zoo.callbacks.monitoring as monitoring
from tests.callbacks.callback_testing import TinyClassifier, tiny_loader
from zoo.callbacks import TrainingMonitor


class NaNLossAt(TinyClassifier):
    """Returns a NaN loss at optimizer step ``k``."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step == self.k else loss


class NaNGradIn(TinyClassifier):
    """Poisons the gradient of the last layer's bias at step 2."""

    def on_after_backward(self):
        if self.trainer.global_step == 2:
            self.net[3].bias.grad[0] = float("inf")


def kinds(monitor):
    return [a["kind"] for a in monitor.anomalies]


def test_nan_loss_stop_writes_a_healthy_checkpoint_first(make_trainer, tmp_path):
    L.seed_everything(0)
    model, monitor = NaNLossAt(3), TrainingMonitor(action="stop", report_dir=str(tmp_path))
    make_trainer(max_steps=10, limit_val_batches=0, callbacks=[monitor]).fit(model, tiny_loader())
    assert kinds(monitor)[0] == "nan_loss" and monitor.anomalies[0]["step"] == 3
    assert monitor.anomalies[0]["action"] == "stop"
    assert monitor.anomalies[0]["first_non_finite"]["where"] == "training_step"  # modules are finite
    assert len(model.snapshots) == 4  # the poisoned step ran with no gradients, then training stopped
    saved = torch.load(monitor.stopped_checkpoint, weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in saved.values())
    for name, _ in model.named_parameters():  # the weights before the poisoned step, unchanged by it
        assert torch.equal(saved[name], model.snapshots[2][name]) and torch.equal(
            saved[name], model.snapshots[3][name]
        )
    report = json.loads((tmp_path / "training_report.json").read_text())
    assert report["anomalies"][0]["kind"] == "nan_loss" and report["recommendations"]
    assert "nan_loss" in (tmp_path / "training_report.md").read_text()


def test_nan_gradient_is_named_and_skip_step_keeps_weights(make_trainer, tmp_path):
    L.seed_everything(0)
    model, monitor = NaNGradIn(), TrainingMonitor(action="skip_step", report_dir=str(tmp_path))
    make_trainer(max_steps=5, limit_val_batches=0, callbacks=[monitor]).fit(model, tiny_loader())
    (anomaly,) = [a for a in monitor.anomalies if a["kind"] == "nan_grad"]
    assert anomaly["parameters"] == ["net.3.bias"] and anomaly["action"] == "skip_step"
    # the forward re-run is finite, so the trace names the first parameter with a non-finite gradient
    assert anomaly["first_non_finite"]["where"] == "gradient"
    assert anomaly["first_non_finite"]["name"] == "net.3.bias"
    assert all(
        torch.equal(model.snapshots[2][k], model.snapshots[1][k]) for k in ("net.0.weight", "net.3.bias")
    )
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_exploding_learning_rate_is_detected(make_trainer, tmp_path):
    L.seed_everything(0)
    model = TinyClassifier(lr=1e3)
    model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=1e3)
    monitor = TrainingMonitor(explode_threshold=50.0, report_dir=str(tmp_path))
    make_trainer(max_steps=8, limit_val_batches=0, callbacks=[monitor]).fit(model, tiny_loader())
    assert {"exploding_grad", "loss_spike"} & set(kinds(monitor)), monitor.anomalies


def test_dead_parameters_and_bad_data_are_reported(make_trainer, tmp_path):
    class Unused(TinyClassifier):
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Linear(3, 3)

        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) + 0 * self.unused.weight.sum()

    L.seed_everything(0)
    x = torch.randn(32, 8) * 1e4
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, torch.zeros(32, dtype=torch.long)), 8
    )
    monitor = TrainingMonitor(log_every_n_steps=1, report_dir=str(tmp_path))
    make_trainer(max_steps=2, limit_val_batches=0, callbacks=[monitor]).fit(Unused(), loader)
    dead = [a for a in monitor.anomalies if a["kind"] == "dead_params"]
    assert dead and "unused.weight" in dead[0]["parameters"]
    messages = " ".join(a["message"] for a in monitor.anomalies if a["kind"] == "data")
    assert "not normalised" in messages and "single class" in messages


def test_statistics_are_logged_and_the_report_summarises(make_trainer, tmp_path):
    L.seed_everything(0)
    monitor = TrainingMonitor(log_every_n_steps=2)
    logger = CSVLogger(tmp_path, name="run")
    trainer = make_trainer(
        max_steps=6, limit_val_batches=0, logger=logger, log_every_n_steps=1, callbacks=[monitor]
    )
    trainer.fit(TinyClassifier(), tiny_loader())
    logged = (tmp_path / "run" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in (
        "monitor/grad_norm",
        "monitor/grad_norm/net.0",
        "monitor/update_to_weight",
        "monitor/lr/pg0",
        "monitor/samples_per_s",
        "monitor/rss_gb",
        "monitor/weight_std/net.0.weight",
    ):
        assert key in logged, key
    report = json.loads((tmp_path / "run" / "version_0" / "training_report.json").read_text())
    assert report["summary"]["steps"] == 6 and report["summary"]["samples_per_s_peak"] > 0
    assert report["anomalies"] == [] and report["data"]["1"]["label_counts"]


def test_rejects_unknown_action():
    with pytest.raises(ValueError, match="action"):
        TrainingMonitor(action="explode")


def test_tokens_per_second_for_sequence_batches(make_trainer, tmp_path):
    class Sequences(TinyClassifier):
        def training_step(self, batch, batch_idx):
            return super().training_step((batch["x"], batch["y"]), batch_idx)

    data = [{"x": torch.randn(4, 8), "y": torch.randint(0, 4, (4,)), "attention_mask": torch.ones(4, 5)}] * 4
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    monitor = TrainingMonitor(report_dir=str(tmp_path))
    make_trainer(max_steps=4, limit_val_batches=0, callbacks=[monitor]).fit(Sequences(), loader)
    summary = json.loads((tmp_path / "training_report.json").read_text())["summary"]
    assert summary["tokens_per_s_peak"] == pytest.approx(5 * summary["samples_per_s_peak"])


def test_fused_weight_statistics_equal_per_tensor_reductions():
    torch.manual_seed(0)
    named = [
        ("a.weight", torch.randn(16, 8) * 0.3 + 0.1),
        ("b.weight", torch.randn(4, 3, 3)),
        ("b.bias", torch.randn(4)),
    ]
    stats = TrainingMonitor._weight_statistics(named)
    assert not any("b.bias" in key for key in stats)  # biases and norms are left out
    for name, value in named[:2]:
        assert stats[f"monitor/weight_mean/{name}"] == pytest.approx(float(value.mean()), abs=1e-6)
        assert stats[f"monitor/weight_std/{name}"] == pytest.approx(float(value.std()), rel=1e-5)
        assert stats[f"monitor/weight_max/{name}"] == pytest.approx(float(value.abs().max()), rel=1e-6)
    infinite = torch.tensor([[1.0, -float("inf")]])
    nan = torch.tensor([[1.0, float("nan")]])
    stats = TrainingMonitor._weight_statistics([("inf", infinite), ("nan", nan), ("empty", torch.ones(0, 3))])
    assert stats["monitor/weight_max/inf"] == float("inf") and np.isnan(stats["monitor/weight_max/nan"])
    assert not any("empty" in key for key in stats)  # nothing to describe


class Recorder(Logger):
    """Keeps every logged row in memory."""

    name, version = "recorder", 0

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, float]] = []

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append(dict(metrics))

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass


@pytest.mark.parametrize("cache_bytes", [64, 2**19])
def test_update_ratio_and_weight_statistics_are_those_of_the_weights(make_trainer, monkeypatch, cache_bytes):
    """Reduced run by run (64 bytes: one tensor a run), from a weight copy kept between logging steps, the
    logged update-to-weight ratio and weight statistics equal direct reductions of the weights."""

    class CopyMemory(Callback):  # after the monitor's hook: its copy of the weights, between logging steps
        def __init__(self) -> None:
            self.addresses: list[int] = []

        def on_train_batch_end(self, trainer, *args) -> None:
            if monitor._weights_buffer is not None and trainer.global_step % 2 == 0:
                self.addresses.append(monitor._weights_buffer[0].data_ptr())

    monkeypatch.setattr(monitoring, "CACHE_BYTES", cache_bytes)
    L.seed_everything(0)
    model, monitor, logger, memory = (
        TinyClassifier(),
        TrainingMonitor(log_every_n_steps=2),
        Recorder(),
        CopyMemory(),
    )
    make_trainer(max_steps=6, limit_val_batches=0, logger=logger, callbacks=[monitor, memory]).fit(
        model, tiny_loader()
    )
    rows = [row for row in logger.rows if "monitor/update_to_weight" in row]
    assert (
        len(rows) == 3 and len(memory.addresses) == 3 and len(set(memory.addresses)) == 1
    )  # one copy, reused
    assert monitor._weights_buffer is None  # released at fit end
    names = [name for name, _ in model.named_parameters()]
    for step, row in zip((1, 3, 5), rows):
        before, after = model.snapshots[step - 1], model.snapshots[step]
        update = torch.stack([(after[n] - before[n]).norm() for n in names]).norm()
        weight = torch.stack([before[n].norm() for n in names]).norm()
        assert row["monitor/update_to_weight"] == pytest.approx(float(update / weight), rel=1e-5)
        for name in ("net.0.weight", "net.3.weight"):
            value = after[name]
            assert row[f"monitor/weight_mean/{name}"] == pytest.approx(float(value.mean()), abs=1e-6)
            assert row[f"monitor/weight_std/{name}"] == pytest.approx(float(value.std()), rel=1e-5)
            assert row[f"monitor/weight_max/{name}"] == pytest.approx(float(value.abs().max()), rel=1e-6)


class Blowup(nn.Module):
    """Multiplies by ``gain``: 1, or 1e39 (inf in float32) when its model arms it."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = 1.0

    def forward(self, x):
        return x * self.gain


class BlowsUp(TinyClassifier):
    """``net.4`` outputs inf at the optimizer steps in ``poison_steps`` (the loss becomes NaN) and the loss is
    100x at ``spike_steps``; a per-step LambdaLR; records weights, optimizer state and lr after each batch."""

    def __init__(self, poison_steps=(), spike_steps=(), dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(8, 16),
            nn.BatchNorm1d(16),
            nn.ReLU(),
            nn.Dropout(dropout) if dropout else nn.Identity(),
            Blowup(),
            nn.Linear(16, 4),
        )
        self.poison_steps, self.spike_steps = set(poison_steps), set(spike_steps)
        self.after_batch: list[tuple[dict, dict, float]] = []

    def on_train_batch_start(self, batch, batch_idx):
        self.net[4].gain = 1e39 if self.trainer.global_step in self.poison_steps else 1.0

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("steps_logged", 1.0, on_step=False, on_epoch=True, reduce_fx="sum")
        return loss * 100 if self.trainer.global_step in self.spike_steps else loss

    def on_train_batch_end(self, outputs, batch, batch_idx):  # after the callbacks' hook
        optimizer = copy.deepcopy(self.optimizers().optimizer.state_dict())
        self.after_batch.append((self.state_copy(), optimizer, self.lr_schedulers().get_last_lr()[0]))

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def equal(a, b) -> bool:
    """Nested state (dicts, lists, tensors, numbers) equal, tensors exactly."""
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return a == b


def parameters(state: dict, model: nn.Module) -> dict:
    return {name: state[name] for name, _ in model.named_parameters()}


def test_skip_step_names_the_layer_and_its_trace_leaves_the_run_untouched(
    make_trainer, tmp_path, monkeypatch
):
    def run():
        L.seed_everything(0)
        model = BlowsUp(poison_steps={3}, dropout=0.5)
        monitor = TrainingMonitor(action="skip_step", report_dir=str(tmp_path))
        trainer = make_trainer(max_steps=6, limit_val_batches=0, callbacks=[monitor])
        trainer.fit(model, tiny_loader())
        assert trainer.callback_metrics["steps_logged"] == 6  # the trace's training_step logged nothing
        return model, monitor, (torch.get_rng_state(), np.random.get_state()[1].tolist(), random.getstate())

    model, monitor, streams = run()
    (anomaly, *_) = monitor.anomalies
    assert (anomaly["kind"], anomaly["step"], anomaly["action"]) == ("nan_loss", 3, "skip_step")
    origin = anomaly["first_non_finite"]
    assert (origin["where"], origin["name"], origin["type"]) == ("module", "net.4", "Blowup")
    assert equal(parameters(model.snapshots[3], model), parameters(model.snapshots[2], model))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # The trace's forward (dropout draws, BatchNorm statistics) is invisible: the same run without it ends
    # with the same weights, buffers and random streams.
    monkeypatch.setattr(TrainingMonitor, "_replay", lambda *args: None)
    untraced, _, untraced_streams = run()
    assert equal(model.state_dict(), untraced.state_dict()) and equal(streams, untraced_streams)


def test_rollback_restores_the_snapshot_and_training_continues(make_trainer, tmp_path):
    L.seed_everything(0)
    model = BlowsUp(poison_steps={5, 7})
    monitor = TrainingMonitor(action="rollback", rollback_every_n_steps=2, report_dir=str(tmp_path))
    make_trainer(max_steps=10, limit_val_batches=0, callbacks=[monitor]).fit(model, tiny_loader())
    nan_losses = [a for a in monitor.anomalies if a["kind"] == "nan_loss"]
    # snapshots every 2 healthy steps: before steps 1 and 3; step 6 alone is not enough for a new one
    assert [(a["step"], a["action"], a["rolled_back_to_step"]) for a in nan_losses] == [
        (5, "rollback", 3),
        (7, "rollback", 3),
    ]
    assert nan_losses[0]["first_non_finite"]["name"] == "net.4" and monitor.rollbacks == 2
    # After step 5: the weights, optimizer state and learning rate of the end of step 2, with the BatchNorm
    # statistics of step 3's forward (the snapshot is taken once step 3's checks passed, before its update).
    state, optimizer, lr = model.after_batch[5]
    weights = parameters(model.after_batch[2][0], model)
    assert equal(state, {**model.after_batch[3][0], **weights})
    assert equal(optimizer, model.after_batch[2][1]) and lr == model.after_batch[2][2]
    # Step 6 trained from the restored state without altering the snapshot: step 7 restores it again.
    assert not equal(model.after_batch[6][1], optimizer) and equal(model.after_batch[7], model.after_batch[5])
    assert len(model.after_batch) == 10 and all(torch.isfinite(p).all() for p in model.parameters())
    report = json.loads((tmp_path / "training_report.json").read_text())
    assert report["rollbacks"] == 2 and report["anomalies"][0]["action"] == "rollback"
    assert "step 5: **nan_loss**" in (tmp_path / "training_report.md").read_text()


def test_rollback_gives_up_after_max_rollbacks_and_stops(make_trainer, tmp_path):
    L.seed_everything(0)
    model = BlowsUp(poison_steps=range(4, 20))
    monitor = TrainingMonitor(
        action="rollback", rollback_every_n_steps=2, max_rollbacks=2, report_dir=str(tmp_path)
    )
    trainer = make_trainer(max_steps=20, limit_val_batches=0, callbacks=[monitor])
    trainer.fit(model, tiny_loader())
    acted = [(a["step"], a["action"]) for a in monitor.anomalies if a["kind"] == "nan_loss"]
    assert acted == [(4, "rollback"), (5, "rollback"), (6, "stop")]
    assert trainer.global_step == 7 and monitor.stopped["step"] == 6
    assert "2 rollbacks to the state before step 3" in monitor.stopped["reason"]
    assert (tmp_path / "before-anomaly-step6.ckpt").exists()


def test_stop_report_names_layer_step_and_a_checkpoint_that_resumes(make_trainer, tmp_path):
    L.seed_everything(0)
    model, monitor = BlowsUp(poison_steps={3}), TrainingMonitor(action="stop", report_dir=str(tmp_path))
    make_trainer(max_steps=8, limit_val_batches=0, callbacks=[monitor]).fit(model, tiny_loader())
    stopped = json.loads((tmp_path / "training_report.json").read_text())["stopped"]
    assert stopped["step"] == 3 and stopped["anomalies"][0] == "nan_loss" and stopped["action"] == "stop"
    assert stopped["first_non_finite"]["name"] == "net.4"
    assert stopped["checkpoint"] == str(tmp_path / "before-anomaly-step3.ckpt")
    markdown = (tmp_path / "training_report.md").read_text()
    assert (
        "Stopped at step 3" in markdown
        and "'net.4' (Blowup)" in markdown
        and stopped["checkpoint"] in markdown
    )

    resumed, monitor = BlowsUp(), TrainingMonitor(action="stop", report_dir=str(tmp_path / "resumed"))
    trainer = make_trainer(max_steps=8, limit_val_batches=0, callbacks=[monitor])
    trainer.fit(resumed, tiny_loader(), ckpt_path=stopped["checkpoint"])
    assert trainer.global_step == 8 and len(resumed.snapshots) == 5  # steps 3..7, from the healthy weights
    assert all(torch.isfinite(p).all() for p in resumed.parameters())
    assert monitor.stopped is None and monitor.anomalies[0]["checkpoint"] == stopped["checkpoint"]


@pytest.mark.parametrize("action", ["skip_step", "rollback"])
def test_a_resumed_run_reports_what_an_uninterrupted_one_does(make_trainer, tmp_path, action):
    """Split at step 8: the NaN at step 2 and the loss spike at step 9 (found only if the loss window was
    carried over) are reported alike, and the NaN at step 10 is acted on alike."""

    def run(max_steps, folder, ckpt_path=None):
        L.seed_everything(0)
        model = BlowsUp(poison_steps={2, 10}, spike_steps={9})
        monitor = TrainingMonitor(action=action, rollback_every_n_steps=4, report_dir=str(tmp_path / folder))
        checkpoints = ModelCheckpoint(tmp_path / folder, every_n_train_steps=4, save_top_k=-1)
        trainer = make_trainer(
            max_steps=max_steps,
            limit_val_batches=0,
            enable_checkpointing=True,
            callbacks=[monitor, checkpoints],
        )
        trainer.fit(model, tiny_loader(), ckpt_path=ckpt_path)
        return model, monitor

    whole, whole_monitor = run(12, "whole")
    run(8, "first")
    checkpoint = tmp_path / "first" / "epoch=0-step=8.ckpt"
    state = torch.load(checkpoint, weights_only=True)["callbacks"]["TrainingMonitor"]
    assert len(state["history"]) == 7  # steps 0..7 but the NaN
    resumed, resumed_monitor = run(12, "second", ckpt_path=checkpoint)
    assert [(a["step"], a["kind"]) for a in whole_monitor.anomalies] == [
        (2, "nan_loss"),
        (2, "nan_grad"),
        (9, "loss_spike"),
        (10, "nan_loss"),
        (10, "nan_grad"),
    ]
    assert resumed_monitor.anomalies == whole_monitor.anomalies
    assert resumed_monitor.history == whole_monitor.history
    assert resumed_monitor.rollbacks == whole_monitor.rollbacks == (3 if action == "rollback" else 0)
    if action == "rollback":  # steps 9 and 10 go back to the state checkpointed before step 8
        targets = [a["rolled_back_to_step"] for a in whole_monitor.anomalies if a["kind"] != "nan_grad"]
        assert targets == [0, 8, 8]
    assert equal(resumed.state_dict(), whole.state_dict())
    timings = ("samples_per_s", "step_time", "peak_")
    reports = [
        json.loads((tmp_path / folder / "training_report.json").read_text()) for folder in ("whole", "second")
    ]
    for report in reports:
        report["summary"] = {k: v for k, v in report["summary"].items() if not k.startswith(timings)}
    assert reports[0] == reports[1]
