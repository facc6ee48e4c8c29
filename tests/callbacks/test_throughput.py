"""FLOPs counted from the work that runs (matmuls, convolutions, CPU attention, bilinear sampling), and
throughput with MFU logged for any module with nothing declared."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count
from torch.nn import functional as F

from zoo.callbacks import ThroughputMonitor
from zoo.flops import count_flops, measured_cpu_flops, peak_flops
from zoo.progress import ZooModelSummary, example_forward_flops
from zoo.vision import ImageClassifier


def test_a_linear_layer_costs_two_flops_per_multiply_add_forward_and_twice_that_backward():
    layer, x = torch.nn.Linear(16, 8), torch.randn(4, 16, requires_grad=True)
    forward = 2 * 4 * 16 * 8
    assert count_flops(lambda: layer(x)) == forward
    assert count_flops(lambda: layer(x).sum().backward()) == 3 * forward


def test_cpu_attention_and_bilinear_sampling_are_counted():
    q = torch.randn(2, 3, 10, 8, requires_grad=True)
    attention = 2 * (2 * 3 * 10 * 10 * 8) * 2  # scores and weighted values: 2 batched matmuls
    assert count_flops(lambda: F.scaled_dot_product_attention(q, q, q)) == attention
    assert count_flops(lambda: F.scaled_dot_product_attention(q, q, q).sum().backward()) > 2 * attention
    image, grid = torch.randn(2, 4, 6, 6, requires_grad=True), torch.rand(2, 5, 7, 2) * 2 - 1
    assert count_flops(lambda: F.grid_sample(image, grid, align_corners=False)) == 8 * 2 * 4 * 5 * 7
    assert (
        count_flops(lambda: F.grid_sample(image, grid, align_corners=False).sum().backward())
        == 3 * 8 * 2 * 4 * 5 * 7
    )


def test_the_cpu_peak_is_a_measured_matmul_rate():
    rate = measured_cpu_flops(torch.float32)
    assert 1e8 < rate < 1e14
    assert peak_flops(torch.device("cpu"), torch.float32) == rate
    assert peak_flops(torch.device("meta"), torch.float32) is None


@pytest.fixture
def tiny_classifier(tiny_deit_kwargs):
    return ImageClassifier(num_classes=12, img_size=32, **tiny_deit_kwargs)


def test_the_model_summary_counts_the_forward(tiny_classifier, caplog):
    trainer = L.Trainer(callbacks=[ZooModelSummary()], logger=False, enable_progress_bar=False, max_steps=0)
    expected = example_forward_flops(trainer, tiny_classifier)
    assert expected > 0
    with caplog.at_level(logging.INFO):
        ZooModelSummary().on_fit_start(trainer, tiny_classifier)
    assert f"{get_human_readable_count(expected)}    Total Flops" in caplog.text


def test_a_fit_logs_throughput_and_mfu_with_nothing_declared(
    tiny_classifier, tiny_image_data, tmp_path, single_thread
):
    monitor = ThroughputMonitor(window_size=2)
    logger = L.pytorch.loggers.CSVLogger(tmp_path)
    trainer = L.Trainer(
        max_steps=4, limit_val_batches=2, log_every_n_steps=1, callbacks=[monitor], logger=logger,
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(tiny_classifier, tiny_image_data)
    train, val = monitor.flops[RunningStage.TRAINING], monitor.flops[RunningStage.VALIDATING]
    assert 2.5 < train / val < 3.5  # backward costs about twice the forward
    logged = trainer.logged_metrics
    assert 0 < logged["train/device/mfu"] < 1
    assert logged["train/device/flops_per_sec"] > 0 and logged["train/device/samples_per_sec"] > 0


def test_counts_travel_in_checkpoints_so_a_resumed_fit_does_not_count_again():
    monitor = ThroughputMonitor()
    monitor.flops = {RunningStage.TRAINING: 300, RunningStage.VALIDATING: 100}
    resumed = ThroughputMonitor()
    resumed.load_state_dict(monitor.state_dict())
    assert resumed.flops == monitor.flops
