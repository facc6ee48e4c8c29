"""Running a 2-process ``zoo fit`` (gloo, CPU) as its own process group, and comparing where two runs ended
when their ``last.ckpt`` may be a sharded directory (FSDP2)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.conftest import REPO_ROOT, SUBPROCESS_TIMEOUT
from tests.resume.harness import QUIET, _equal, assert_same_checkpoints_and_logs
from zoo.checkpointing import consolidate_checkpoint
from zoo.resume import find_last_checkpoint

TWO_PROCESSES = ["--trainer.accelerator=cpu", "--trainer.devices=2"]


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def zoo_fit_group(root: Path, *args: str, timeout: float = SUBPROCESS_TIMEOUT) -> tuple[int, str]:
    """``python -m zoo fit ARGS`` in a new session: its ranks (Lightning launches rank 1 as a child) and any
    process they start share one process group. Returns the exit status and the output once every process
    of the group has ended; a run still going after ``timeout`` seconds is killed as a group and fails the
    test, as does a process left behind after the launching one ended."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "zoo", "fit", *args, *TWO_PROCESSES]
    command += [f"--trainer.default_root_dir={root}", *QUIET]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        start_new_session=True,
    )
    try:
        # the pipe reaches EOF once every process holding it (all ranks) has ended
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"zoo fit still running after {timeout} s, killed\n{output[-5000:]}") from None
    finally:
        left = []
        deadline = time.monotonic() + 10
        while (left := group_members(process.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        if left:
            os.killpg(process.pid, signal.SIGKILL)
    assert not left, f"processes {left} of the run were left behind\n{output[-5000:]}"
    return process.returncode, output


def fit(root: Path, *args: str) -> str:
    status, output = zoo_fit_group(root, *args)
    assert status == 0, f"exit {status}\n{output[-6000:]}"
    return output


def final_checkpoint(root: Path, scratch: Path) -> dict:
    """The newest ``last.ckpt`` under ``root`` as one dictionary: a sharded directory is consolidated (the
    full weights and optimizer states the ranks held, with the Trainer's state from ``meta.pt``)."""
    path = find_last_checkpoint(root)
    assert path is not None, f"no last.ckpt under {root}"
    if path.is_dir():
        scratch.mkdir(parents=True, exist_ok=True)
        consolidate_checkpoint(path, scratch / "consolidated.ckpt")
        path = scratch / "consolidated.ckpt"
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_end(resumed_root: Path, reference_root: Path, scratch: Path, atol: float = 0.0) -> dict:
    """``tests.resume.harness.assert_same_end`` for checkpoints that may be sharded: weights, optimizer,
    schedulers, loops, callback states and the logged metrics of the resumed run equal the reference's."""
    resumed = final_checkpoint(resumed_root, scratch / "resumed")
    reference = final_checkpoint(reference_root, scratch / "reference")
    return assert_same_checkpoints_and_logs(resumed, reference, resumed_root, reference_root, atol)


CALLBACKS = "tests.resume.distributed_callbacks"


def kill_rank(step: int, during_save: bool = False) -> list[str]:
    """``zoo fit`` arguments adding ``KillRankAtStep`` (rank 1)."""
    added = [f"--trainer.callbacks+={CALLBACKS}.KillRankAtStep", f"--trainer.callbacks.step={step}"]
    return [*added, "--trainer.callbacks.during_save=true"] if during_save else added


def record_ranks(root: Path) -> list[str]:
    """``zoo fit`` arguments adding ``RecordRankState``, writing under ``root/ranks``."""
    return [
        f"--trainer.callbacks+={CALLBACKS}.RecordRankState",
        f"--trainer.callbacks.folder={root / 'ranks'}",
    ]


def assert_same_ranks(resumed_root: Path, reference_root: Path, world_size: int = 2) -> None:
    """Every rank ended with the same weights (or shards), optimizer state, generator state and step."""
    for rank in range(world_size):
        resumed, reference = (
            torch.load(root / "ranks" / f"rank{rank}.pt", weights_only=True)
            for root in (resumed_root, reference_root)
        )
        _equal(resumed, reference, f"rank {rank}", 0.0)
