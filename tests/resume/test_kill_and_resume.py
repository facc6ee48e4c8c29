"""A ``zoo fit`` killed at a random optimizer step mid-epoch and resumed with ``--ckpt_path last`` ends where
an uninterrupted run with the same seed ends: weights, optimizer, schedulers, EMA, generators and logs."""

from __future__ import annotations

import random

import pytest

from tests.resume.harness import assert_same_end, last_checkpoint, zoo_fit

EVERY = 3  # --resume.every_n_train_steps: a kill loses at most this many steps

FAMILIES = {
    "vision": (
        [
            *("--config", "deit_tiny", "--data.init_args.train_size=192", "--data.init_args.val_size=64"),
            *("--data.init_args.batch_size=32", "--trainer.max_epochs=3"),
        ],
        18,
    ),
}


@pytest.mark.parametrize("family", ["vision"])
def test_sigkill_then_resume_from_last_ends_like_an_uninterrupted_run(family, tmp_path):
    args, steps = FAMILIES[family]
    resume_every = f"--resume.every_n_train_steps={EVERY}"
    zoo_fit(tmp_path / "full", *args, resume_every)
    kill_at = random.Random(family).randrange(EVERY + 1, steps - 1)
    fault = ["--trainer.callbacks+=tests.resume.faults.SignalAtStep", f"--trainer.callbacks.step={kill_at}"]
    zoo_fit(tmp_path / "killed", *args, resume_every, *fault, expect=-9)
    saved = last_checkpoint(tmp_path / "killed")["global_step"]
    assert kill_at - EVERY <= saved < kill_at, (saved, kill_at)
    zoo_fit(tmp_path / "killed", *args, resume_every, "--ckpt_path", "last")
    assert last_checkpoint(tmp_path / "full")["global_step"] == steps
    assert_same_end(tmp_path / "killed", tmp_path / "full")
