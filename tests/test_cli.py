"""The `zoo` command: every config runs, configs compose, outputs are reported, checkpoints evaluate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from zoo.cli import ZooCLI

from .conftest import CONFIGS, REPO_ROOT

# configs/<family>/sizes/ hold published-size recipes for GPU clusters (up to 15B parameters): they
# are built on the meta device by their family's tests, not run here.
MODEL_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name not in {"strategy", "sizes"})
# Lightning refuses FSDPStrategy and DeepSpeed without CUDA: those configs are validated on CPU by
# tests/distributed/test_strategy_configs.py and run for real by its `gpu` tests.
CPU_STRATEGY_CONFIGS = [CONFIGS / "strategy" / f"{name}.yaml" for name in ("ddp", "fsdp2")]
DEFAULT_CONFIG = CONFIGS / "vision" / "deit_tiny.yaml"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def run_cli(*args: str, root: Path) -> ZooCLI:
    return ZooCLI(args=[*args, f"--trainer.default_root_dir={root}", *QUIET])


@pytest.mark.parametrize("config", MODEL_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_runs(config, tmp_path):
    cli = run_cli("fit", "--config", str(config), "--trainer.fast_dev_run=true", root=tmp_path)
    assert cli.trainer.state.finished
    assert cli.trainer.global_step == 1


def test_data_determined_values_are_linked_into_the_model(tmp_path):
    cli = ZooCLI(args=["--config", str(DEFAULT_CONFIG), "--data.init_args.image_size=16"], run=False)
    assert cli.model.num_classes == cli.datamodule.num_classes == 12
    assert cli.model.hparams.img_size == 16


def test_print_config_is_complete_and_reruns(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ZooCLI(args=["fit", "--config", str(DEFAULT_CONFIG), "--print_config"])
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    assert config["model"]["class_path"] == "zoo.vision.ImageClassifier"
    assert config["model"]["init_args"]["optimizer"]["class_path"] == "torch.optim.AdamW"
    path = tmp_path / "printed.yaml"
    path.write_text(printed)
    cli = run_cli("fit", "--config", str(path), "--trainer.fast_dev_run=true", root=tmp_path)
    assert cli.trainer.state.finished


def test_fit_then_validate_test_predict_from_the_checkpoint(tmp_path, capsys):
    small = [
        "--data.init_args.train_size=64",
        "--data.init_args.val_size=32",
        "--data.init_args.test_size=32",
    ]
    run_cli(
        "fit",
        "--config",
        str(DEFAULT_CONFIG),
        *small,
        "--trainer.max_steps=2",
        "--trainer.max_epochs=1",
        root=tmp_path,
    )
    report = capsys.readouterr().out
    assert "zoo: outputs written" in report and "best checkpoint:" in report
    checkpoint = next(tmp_path.rglob("last.ckpt"))
    for command in ("validate", "test"):
        cli = run_cli(
            command, "--config", str(DEFAULT_CONFIG), *small, f"--ckpt_path={checkpoint}", root=tmp_path
        )
        metrics = cli.trainer.callback_metrics
        assert f"{'val' if command == 'validate' else 'test'}/acc" in metrics
    cli = run_cli(
        "predict", "--config", str(DEFAULT_CONFIG), *small, f"--ckpt_path={checkpoint}", root=tmp_path
    )
    assert cli.trainer.state.finished


def test_python_dash_m_zoo_is_the_same_command():
    result = subprocess.run(
        [sys.executable, "-m", "zoo", "fit", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout and "--model" in result.stdout


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", CPU_STRATEGY_CONFIGS, ids=lambda p: p.stem)
def test_strategy_configs_compose_with_a_model_config(strategy, tmp_path):
    """`zoo fit --config A.yaml --config configs/strategy/X.yaml --trainer.max_epochs=...` (2 gloo processes)."""
    command = [
        sys.executable, "-m", "zoo", "fit", "--config", str(DEFAULT_CONFIG), "--config", str(strategy),
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
        "--data.init_args.train_size=256", "--data.init_args.val_size=64", "--data.init_args.batch_size=16",
        f"--trainer.default_root_dir={tmp_path}", *QUIET,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "zoo: outputs written" in result.stdout
