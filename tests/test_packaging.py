"""Only the `zoo` namespace is installed, for `pip install .` and `pip install -e .` alike."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .conftest import REPO_ROOT

IMPORTS = (
    "import zoo, zoo.callbacks, zoo.datamodules, importlib.util;"
    "from zoo.vision import ImageClassifier;"
    "from zoo.datamodules import ImageClassificationDataModule;"
    "assert importlib.util.find_spec('datamodules') is None, 'top-level datamodules installed';"
    "assert importlib.util.find_spec('callbacks') is None, 'top-level callbacks installed';"
    "print(zoo.__file__); print(zoo.datamodules.__file__); print(zoo.list_models()[0].config_path)"
)


def _python(code: str, cwd: Path, **env: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **env},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.split()


def test_regular_install_ships_only_the_zoo_namespace(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(REPO_ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    top_level = {p.name for p in target.iterdir() if not p.name.endswith((".dist-info", ".egg-info"))}
    assert top_level - {"bin"} == {"zoo"}
    assert (target / "zoo" / "configs" / "vision" / "deit_tiny.yaml").is_file()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    zoo_file, datamodules_file, config = _python(IMPORTS, outside, PYTHONPATH=str(target))
    assert all(Path(p).is_relative_to(target) for p in (zoo_file, datamodules_file, config))
    # another project's empty folder: the shipped config is found by its model name and trains
    fit = subprocess.run(
        [sys.executable, "-m", "zoo", "fit", "--config", "deit_tiny", "--trainer.fast_dev_run=true"],
        capture_output=True, text=True, cwd=outside, timeout=600,
        env={**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "zoo: fit done in" in fit.stdout


def test_editable_install_maps_the_same_namespace(tmp_path):
    zoo_file, datamodules_file, config = _python(IMPORTS, tmp_path)
    assert Path(datamodules_file) == REPO_ROOT / "datamodules" / "__init__.py"
    assert Path(config) == REPO_ROOT / "configs" / "vision" / "vit_tiny.yaml"
    assert Path(zoo_file).is_relative_to(REPO_ROOT)
