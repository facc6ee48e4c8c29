"""``zoo.callbacks.TrainingMonitor``: each anomaly is provoked, detected, named and acted on."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

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
