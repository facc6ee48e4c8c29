"""Running ``zoo fit`` as a subprocess and comparing where two runs ended."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import REPO_ROOT, SUBPROCESS_TIMEOUT
from zoo.resume import find_last_checkpoint

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def zoo_fit(
    root: Path, *args: str, expect: int = 0, timeout: int = SUBPROCESS_TIMEOUT
) -> subprocess.CompletedProcess:
    """``python -m zoo fit ARGS`` with its runs under ``root``; one thread, as two tests may run at once."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "zoo", "fit", *args, f"--trainer.default_root_dir={root}", *QUIET]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=timeout)
    assert done.returncode == expect, (
        f"exit {done.returncode}, expected {expect}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    )
    return done


def last_checkpoint(root: Path) -> dict:
    path = find_last_checkpoint(root)
    assert path is not None, f"no last.ckpt under {root}"
    return torch.load(path, map_location="cpu", weights_only=False)


def logged_rows(root: Path) -> list[dict]:
    (metrics,) = Path(root).rglob("metrics.csv")
    with open(metrics, newline="") as file:
        return list(csv.DictReader(file))


def _equal(a, b, path: str, atol: float) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, path
        if atol == 0 or not a.is_floating_point():
            assert torch.equal(a, b), f"{path} differs"
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=path)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for key in a:
            _equal(a[key], b[key], f"{path}.{key}", atol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _equal(x, y, f"{path}[{i}]", atol)
    elif isinstance(a, float) and atol:
        assert abs(a - b) <= atol * 10, f"{path}: {a} vs {b}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


# What differs between two runs in two folders and is not state: where they wrote, when.
# `current_score` is the score of the newest top-k save, which ModelCheckpoint does not restore on resume.
UNCOMPARED_CALLBACK_KEYS = {
    "dirpath",
    "best_model_path",
    "last_model_path",
    "kth_best_model_path",
    "best_k_models",
    "current_score",
}
UNCOMPARED_COLUMNS = {
    "monitor/step_time_s",
    "monitor/samples_per_s",
    "monitor/tokens_per_s",
    "monitor/rss_gb",
}
#: Throughput (zoo.callbacks.ThroughputMonitor): timings, and counts since the process started
UNCOMPARED_SUFFIXES = ("_per_sec", "/mfu", "/time", "/batches", "/samples", "/lengths")


def compared(column: str) -> bool:
    return column not in UNCOMPARED_COLUMNS and not column.endswith(UNCOMPARED_SUFFIXES)


def assert_same_end(resumed_root: Path, reference_root: Path, atol: float = 0.0) -> dict:
    """Weights, optimizer, schedulers, loop counters, callback states (EMA, generators...) and the logged
    metrics of the resumed run equal the uninterrupted run's (to ``atol`` where the family is not bit-exact)."""
    return assert_same_checkpoints_and_logs(
        last_checkpoint(resumed_root), last_checkpoint(reference_root), resumed_root, reference_root, atol
    )


def assert_same_checkpoints_and_logs(
    resumed: dict, reference: dict, resumed_root: Path, reference_root: Path, atol: float = 0.0
) -> dict:
    """The comparison of ``assert_same_end``, for checkpoints loaded by the caller (sharded ones merged)."""
    for key in ("global_step", "epoch"):
        assert resumed[key] == reference[key], key
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "loops"):
        _equal(resumed.get(key), reference.get(key), key, atol)
    for name, state in reference["callbacks"].items():
        assert name in resumed["callbacks"], f"callback state {name} missing after resume"
        kept = {k: v for k, v in state.items() if k not in UNCOMPARED_CALLBACK_KEYS}
        other = {k: v for k, v in resumed["callbacks"][name].items() if k in kept}
        _equal(other, kept, f"callbacks[{name}]", atol)
    rows, expected = logged_rows(resumed_root), logged_rows(reference_root)
    assert len(rows) == len(expected), f"{len(rows)} logged rows vs {len(expected)}"
    for row, want in zip(rows, expected):
        for column in filter(compared, want.keys()):
            if atol and want[column] and row[column]:
                assert abs(float(row[column]) - float(want[column])) <= max(atol * 10, 1e-4), column
            else:
                assert row[column] == want[column], f"{column}: {row[column]} vs {want[column]}"
    return reference
