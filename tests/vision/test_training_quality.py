"""The default recipe learns the embedded shapes (a shorter, half-depth run than `make train`)."""

from __future__ import annotations

import pytest

from zoo.cli import ZooCLI

from ..conftest import CONFIGS


@pytest.mark.slow
def test_default_recipe_reaches_90_percent_validation_accuracy(tmp_path):
    """Same config as `make train`, 6 of 12 blocks, 600 steps: about 2.5 minutes on 2 cores."""
    cli = ZooCLI(
        args=[
            "fit", "--config", str(CONFIGS / "vision" / "deit_tiny.yaml"),
            "--model.init_args.model_kwargs={depth: 6}", "--data.init_args.train_size=7680",
            "--trainer.max_epochs=5", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
        ]
    )  # fmt: skip
    assert cli.trainer.global_step == 600
    assert cli.trainer.callback_metrics["val/acc"] >= 0.90
