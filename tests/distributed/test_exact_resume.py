"""A run killed with SIGKILL mid-epoch and resumed from its last checkpoint ends exactly where an
uninterrupted run ends: weights, optimizer, EMA, scheduler, metrics, and the losses of every step after
the resume (so the data order within the epoch and the random masks continue too)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch

from tests.conftest import SUBPROCESS_TIMEOUT
from tests.distributed.runs import command, run

pytestmark = pytest.mark.distributed

STEPS, EVERY = 9, 2  # 6 steps an epoch: the kill lands in epoch 0, validation at its end runs after resume


def kill_after_checkpoint(out, family: str, step: int) -> None:
    process = subprocess.Popen(
        command(out, family, "single", STEPS, "--ckpt-every", str(EVERY), "--step-delay", "1.5"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    try:
        while not list((out / "checkpoints").glob(f"*step={step}*.ckpt")):
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert not (out / "result.pt").exists()


def assert_same(resumed, reference) -> None:
    assert resumed["global_step"] == reference["global_step"] == STEPS
    for key in ("weights", "ema"):
        for name, value in reference[key].items():
            assert torch.equal(resumed[key][name], value), f"{key}: {name}"
    for index, state in reference["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(
                torch.as_tensor(resumed["optimizer"]["state"][index][name]), torch.as_tensor(value)
            )
    assert resumed["scheduler"] == reference["scheduler"]
    assert resumed["metrics"] == reference["metrics"]
    assert "val/loss" in reference["metrics"]


@pytest.mark.parametrize("family", ["vit", "esm2"])
def test_sigkill_mid_epoch_then_resume_is_exact(family, tmp_path):
    reference = run(tmp_path / "full", family, "single", STEPS, "--ckpt-every", str(EVERY))
    killed = tmp_path / "killed"
    kill_after_checkpoint(killed, family, step=4)
    # The newest checkpoint on disk (last.ckpt may still be the previous one: the kill can land between
    # Lightning's two writes); atomic writes make whatever file is there complete.
    last = max(
        (killed / "checkpoints").glob("*step=*.ckpt"),
        key=lambda p: torch.load(p, weights_only=True)["global_step"],
    )
    state = torch.load(last, weights_only=True)
    assert state["global_step"] >= 4 and state["global_step"] % 6 != 0  # mid-epoch
    resumed = run(killed, family, "single", STEPS, "--ckpt-every", str(EVERY), "--resume", str(last))
    assert resumed["losses"] == reference["losses"][state["global_step"] :]
    assert_same(resumed, reference)
