"""The `zoo` command: every config runs, configs compose, outputs are reported, checkpoints evaluate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.trainer.states import RunningStage

from zoo.callbacks import ThroughputMonitor, load_compressed
from zoo.cli import ZooCLI, expand_overlays, linked_model_arguments
from zoo.datamodules import ImageClassificationDataModule
from zoo.predict import load_records

from .conftest import CONFIGS, REPO_ROOT

# configs/<family>/sizes/ hold published-size recipes for GPU clusters (up to 15B parameters): they
# are built on the meta device by their family's tests, not run here.
MODEL_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name not in {"strategy", "sizes"})
# Lightning refuses FSDPStrategy and DeepSpeed without CUDA: those configs are validated on CPU by
# tests/distributed/test_strategy_configs.py and run for real by its `gpu` tests.
CPU_STRATEGY_CONFIGS = [CONFIGS / "strategy" / f"{name}.yaml" for name in ("ddp", "fsdp2")]
DEFAULT_CONFIG = CONFIGS / "vision" / "deit_tiny.yaml"
SMALL_DATA = [
    "--data.init_args.train_size=64",
    "--data.init_args.val_size=32",
    "--data.init_args.test_size=32",
]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def run_cli(*args: str, root: Path) -> ZooCLI:
    return ZooCLI(args=[*args, f"--trainer.default_root_dir={root}", *QUIET])


@pytest.mark.parametrize("config", MODEL_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_runs_and_its_checkpoint_reloads(config, tmp_path):
    cli = run_cli("fit", "--config", str(config), "--trainer.fast_dev_run=true", root=tmp_path)
    assert cli.trainer.state.finished
    assert cli.trainer.global_step == 1
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, ThroughputMonitor)]
    assert monitor.flops[RunningStage.TRAINING] > 0  # counted on the real batch, for every family
    checkpoint = tmp_path / "reload.ckpt"
    cli.trainer.save_checkpoint(checkpoint)
    if config.parent.name == "compression":  # the records rebuild the compressed architecture first
        arguments = {k: v for k, v in cli.model.hparams.items() if not k.startswith("_")}
        reloaded = load_compressed(type(cli.model)(**arguments), checkpoint)
    else:
        reloaded = type(cli.model).load_from_checkpoint(checkpoint, map_location="cpu")
    expected = cli.model.state_dict()
    assert reloaded.state_dict().keys() == expected.keys()
    for key, value in reloaded.state_dict().items():  # NaN marks an empty history (the loss-trend weighting)
        if isinstance(value, torch.dtype):  # quantized layers keep their dtype beside the packed weights
            assert value == expected[key], key
        else:
            torch.testing.assert_close(value, expected[key], rtol=0, atol=0, equal_nan=True, msg=key)


def test_data_determined_values_are_linked_into_the_model(tmp_path):
    cli = ZooCLI(args=["--config", str(DEFAULT_CONFIG), "--data.init_args.img_size=16"], run=False)
    assert cli.model.hparams.num_classes == cli.datamodule.num_classes == 12
    assert cli.model.hparams.img_size == 16


class DataWithForeignLinks(ImageClassificationDataModule):
    """Image data that also offers a value no image classifier takes (as a text family's data would)."""

    model_links = {**ImageClassificationDataModule.model_links, "vocab_size": "vocab_size"}
    vocab_size = 33


def test_a_link_reaches_only_models_that_take_the_argument(tmp_path):
    from zoo.vision import ImageClassifier

    data = DataWithForeignLinks(train_size=16, val_size=16, test_size=16)
    linked = {"num_classes": 12, "img_size": 32, "class_names": data.class_names}
    assert linked_model_arguments(data, ImageClassifier) == linked
    cli = ZooCLI(
        args=["--config", str(DEFAULT_CONFIG), f"--data={__name__}.DataWithForeignLinks", *SMALL_DATA],
        run=False,
    )
    assert "vocab_size" not in cli.model.hparams
    cli.trainer.strategy.connect(cli.model)
    cli.trainer.save_checkpoint(tmp_path / "model.ckpt")
    reloaded = type(cli.model).load_from_checkpoint(tmp_path / "model.ckpt")
    assert "vocab_size" not in reloaded.hparams and reloaded.hparams.num_classes == 12


def test_an_overlay_reads_its_base_first_and_wins(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(f"extends: {DEFAULT_CONFIG}\ntrainer: {{max_epochs: 2}}\n")
    overlay = tmp_path / "variant.yaml"
    overlay.write_text("extends: base.yaml\ntrainer: {max_epochs: 3}\nmodel: {init_args: {patch_size: 4}}\n")
    assert expand_overlays(["fit", "--config", str(overlay)]) == [
        "fit", "--config", str(DEFAULT_CONFIG), "--config", str(base), "--config", str(overlay)
    ]  # fmt: skip
    cli = ZooCLI(args=["--config", str(overlay)], run=False)
    assert cli.trainer.max_epochs == 3
    assert cli.model.hparams.patch_size == 4 and cli.model.hparams.stem == "conv"  # from deit_tiny.yaml
    assert cli.config.get("extends") is None  # the saved config.yaml is complete on its own


def test_overlays_that_loop_or_name_no_file_are_reported(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ValueError, match="cycle"):
        expand_overlays(["--config", str(tmp_path / "a.yaml")])
    (tmp_path / "c.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(FileNotFoundError, match=r"missing\.yaml"):
        expand_overlays(["--config", str(tmp_path / "c.yaml")])


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
    small = SMALL_DATA
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
    assert "zoo: fit done in" in report and "best val/acc" in report and "last.ckpt" not in report
    checkpoint = next(tmp_path.rglob("last.ckpt"))
    for command in ("validate", "test"):
        cli = run_cli(
            command, "--config", str(DEFAULT_CONFIG), *small, f"--ckpt_path={checkpoint}", root=tmp_path
        )
        metrics = cli.trainer.callback_metrics
        assert f"{'val' if command == 'validate' else 'test'}/acc" in metrics
    capsys.readouterr()
    cli = run_cli(
        "predict", "--config", str(DEFAULT_CONFIG), *small, f"--ckpt_path={checkpoint}", root=tmp_path
    )
    assert cli.trainer.state.finished
    report = capsys.readouterr().out
    assert "zoo: predictions written to" in report
    folder = Path(report.split("zoo: predictions written to ")[1].split(" (")[0])
    records = load_records(folder)
    assert len(records) == 32 and all("id" in r for r in records)
    run = checkpoint.parent.parent  # validate/test/predict logged inside the run they evaluated
    assert folder.is_relative_to(run / "predict")
    assert {p.name for p in run.iterdir() if p.is_dir()} == {"checkpoints", "validate", "test", "predict"}
    assert [p.name for p in (tmp_path / "lightning_logs").iterdir()] == [run.name]


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
    assert "zoo: fit done in" in result.stdout
