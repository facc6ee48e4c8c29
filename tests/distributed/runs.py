"""Launching ``train_run.py`` from the tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import SUBPROCESS_TIMEOUT

SCRIPT = Path(__file__).with_name("train_run.py")


def command(out: Path, family: str, strategy: str, steps: int, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), str(out), family, strategy, str(steps), *extra]


def run(out: Path, family: str, strategy: str, steps: int, *extra: str) -> dict:
    done = subprocess.run(
        command(out, family, strategy, steps, *extra),
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return torch.load(out / "result.pt", weights_only=True)
