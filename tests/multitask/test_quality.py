"""Slow: the default config, shortened, learns all three embedded tasks (safe bars, see README for the full run)."""

from __future__ import annotations

import pytest

from zoo.cli import ZooCLI

from ..conftest import CONFIGS


@pytest.mark.slow
def test_default_config_learns_every_task(tmp_path):
    """300 steps of the default recipe (its LR schedule fitted to them): about 1 minute alone, 3 contended."""
    cli = ZooCLI(
        args=[
            "fit",
            "--config",
            str(CONFIGS / "multitask" / "arithmetic.yaml"),
            "--trainer.max_steps=300",
            "--trainer.max_epochs=-1",
            "--trainer.limit_train_batches=100",
            "--trainer.check_val_every_n_epoch=3",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.callbacks=[]",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 300
    assert metrics["val/wellformed/acc"] >= 0.70
    assert metrics["val/roles/token_acc"] >= 0.95
    assert metrics["val/value/token_acc"] >= 0.50
    assert metrics["val/value/exact_match"] >= 0.02
