"""The README's "Add your own model" example trains and predicts through the zoo CLI, as printed."""

from __future__ import annotations

import re
import sys

from zoo.cli import ZooCLI
from zoo.predict import load_records

from .conftest import REPO_ROOT

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def readme_example() -> tuple[str, str]:
    """The section's Python and YAML blocks."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("## Add your own model", 1)[1].split("\n## ", 1)[0]
    python = re.search(r"```python\n(.*?)```", section, re.S)
    config = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert python and config, "the README section lost its code blocks"
    return python[1], config[1]


def test_the_readme_example_trains_and_predicts(tmp_path, monkeypatch, single_thread):
    code, config = readme_example()
    (tmp_path / "my_zoo_model.py").write_text(code)
    (tmp_path / "blobs.yaml").write_text(config)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_zoo_model", None)
    cli = ZooCLI(args=["fit", "--config", "blobs.yaml", *QUIET])
    assert cli.model.hparams.in_features == 8 and cli.model.hparams.num_classes == 4  # linked from the data
    assert float(cli.trainer.callback_metrics["val/acc"]) > 0.9
    checkpoint = tmp_path / "runs/lightning_logs/version_0/checkpoints/last.ckpt"
    ZooCLI(args=["predict", "--config", "blobs.yaml", f"--ckpt_path={checkpoint}", *QUIET])
    (folder,) = tmp_path.glob("runs/lightning_logs/version_0/predict/version_*/predictions")
    records = load_records(folder)
    assert len(records) == 256 and {"id", "class", "probability"} <= set(records[0])
