"""``zoo.callbacks.EMA`` under DDP and FSDP2: two CPU processes (gloo), checked against timm's ``ModelEmaV3``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from timm.utils.model_ema import ModelEmaV3

from tests.callbacks.callback_testing import TinyClassifier, tiny_loader
from tests.conftest import SUBPROCESS_TIMEOUT
from zoo.callbacks import EMA

pytestmark = pytest.mark.distributed


class DumpEMA(Callback):
    def __init__(self, directory, ema: EMA) -> None:
        self.directory, self.ema = str(directory), ema

    def on_fit_end(self, trainer, pl_module) -> None:
        state = {"ema": dict(zip(self.ema.names, self.ema.ema)), "snapshots": pl_module.snapshots}
        torch.save(state, f"{self.directory}/rank{trainer.global_rank}.pt")


def test_ddp_ranks_hold_the_same_ema(tmp_path):
    L.seed_everything(0)
    ema = EMA(decay=0.9, warmup=True)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=4,
        accumulate_grad_batches=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ema, DumpEMA(tmp_path, ema)],
    )
    trainer.fit(TinyClassifier(), tiny_loader(n=128))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert len(ranks[0]["snapshots"]) == 4  # 4 optimizer steps, so 4 updates per rank
    model = TinyClassifier()
    reference = ModelEmaV3(model, decay=0.9, use_warmup=True)
    for step, snapshot in enumerate(ranks[0]["snapshots"], start=1):
        model.load_state_dict(snapshot)
        reference.update(model, step=step)
    for name, value in reference.module.state_dict().items():
        if name.startswith("net.1.running") or name.endswith("num_batches_tracked"):
            continue  # BatchNorm statistics are per rank under DDP (no SyncBatchNorm)
        assert torch.equal(ranks[0]["ema"][name], ranks[1]["ema"][name]), name
        assert torch.equal(ranks[0]["ema"][name], value), name


def _run_fsdp2(out_dir, max_steps: int, resume_from=None) -> dict:
    script = Path(__file__).with_name("fsdp2_ema_run.py")
    args = [sys.executable, str(script), str(out_dir), str(max_steps)]
    if resume_from is not None:
        args.append(str(resume_from))
    done = subprocess.run(args, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return torch.load(out_dir / "result.pt", weights_only=True)


def test_fsdp2_ranks_average_their_shards_and_resume_exactly(tmp_path):
    """Each rank averages its shard; the gathered EMA equals timm's on the full weights, and survives resume."""
    full_run = _run_fsdp2(tmp_path / "full", max_steps=4)
    assert len(full_run["snapshots"]) == 4
    model = TinyClassifier()
    reference = ModelEmaV3(model, decay=0.9, use_warmup=True)
    for step, snapshot in enumerate(full_run["snapshots"], start=1):
        model.load_state_dict(snapshot)
        reference.update(model, step=step)
    for name, value in reference.module.state_dict().items():
        torch.testing.assert_close(full_run["ema"][name], value, rtol=0, atol=0, msg=name)

    # The sharded checkpoint written after step 2 (a directory) holds the gathered EMA; resuming on
    # 2 processes re-shards it and ends where the uninterrupted run ended.
    checkpoint = next((tmp_path / "full" / "checkpoints").glob("*step=2*"))
    resumed = _run_fsdp2(tmp_path / "resumed", max_steps=4, resume_from=checkpoint)
    for name, value in full_run["ema"].items():
        if name.startswith("net.1.running"):
            continue  # per-rank BatchNorm statistics: a sharded checkpoint keeps one rank's copy
        assert torch.equal(resumed["ema"][name], value), name
