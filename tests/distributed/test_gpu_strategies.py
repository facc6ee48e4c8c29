"""The CUDA-only strategy configs run for real: FSDP1 variants and DeepSpeed ZeRO-2/3 train, checkpoint and resume.

Each case is the user's command line (``zoo fit`` with a model config and a strategy config) in a subprocess, on
every visible GPU, for a few steps: the run must finish, its training loss be finite, and a run resumed from its
checkpoint must reach the same step count. ``gpu``-marked: skipped on the CPU-only CI machine.
"""

from __future__ import annotations

import csv
import math
import subprocess
import sys

import pytest
import torch

from tests.conftest import CONFIGS, REPO_ROOT

pytestmark = [pytest.mark.gpu, pytest.mark.distributed]

CASES = {
    "fsdp": (),
    "fsdp_grad_op": (),
    "fsdp_activation_checkpointing": ("--trainer.strategy.init_args.activation_checkpointing=true",),
    "fsdp_cpu_offload": ("--trainer.strategy.init_args.cpu_offload=true",),
    "deepspeed_zero2": (),
    "deepspeed_zero3": (),
}
STEPS = 6


def zoo_fit(model_config: str, strategy: str, root, *extra: str) -> subprocess.CompletedProcess:
    strategy_file = "fsdp" if strategy.startswith("fsdp_") and strategy != "fsdp_grad_op" else strategy
    command = [
        sys.executable, "-m", "zoo", "fit",
        "--config", str(CONFIGS / model_config),
        "--config", str(CONFIGS / "strategy" / f"{strategy_file}.yaml"),
        f"--trainer.devices={torch.cuda.device_count()}",
        f"--trainer.max_steps={STEPS}", "--trainer.limit_val_batches=2", "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={root}",
        *CASES.get(strategy, ()), *extra,
    ]  # fmt: skip
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)


def train_losses(root) -> list[float]:
    (metrics,) = root.glob("lightning_logs/version_*/metrics.csv")
    with metrics.open() as rows:
        rows = list(csv.DictReader(rows))
    key = next(k for k in rows[0] if k.startswith("train/loss"))
    return [float(r[key]) for r in rows if r.get(key)]


@pytest.mark.parametrize("model_config", ["vision/vit_tiny.yaml", "protein/esm2_t6_8M.yaml"])
@pytest.mark.parametrize("strategy", sorted(CASES))
def test_strategy_trains_checkpoints_and_resumes_on_gpu(strategy, model_config, tmp_path):
    first = zoo_fit(model_config, strategy, tmp_path / "first")
    assert first.returncode == 0, first.stderr[-4000:]
    losses = train_losses(tmp_path / "first")
    assert losses and all(math.isfinite(x) for x in losses)
    (checkpoint,) = (tmp_path / "first").glob("lightning_logs/version_*/checkpoints/last.ckpt")
    resumed = zoo_fit(
        model_config,
        strategy,
        tmp_path / "resumed",
        f"--ckpt_path={checkpoint}",
        f"--trainer.max_steps={STEPS + 2}",
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert len(train_losses(tmp_path / "resumed")) >= 1  # it went on past the restored step
