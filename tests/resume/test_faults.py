"""Faults a real ``zoo fit`` meets: pre-emption (``SIGTERM``), a full disk or a kill while a checkpoint is
written, and checkpoints that are truncated, corrupt or another model's. Each either resumes to the state of
an uninterrupted run or fails with the zoo's one-paragraph error naming the file."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT
from tests.resume.harness import assert_same_end, last_checkpoint, zoo_fit
from zoo.resume import find_last_checkpoint

EVERY = 3
RUN = [
    *("--config", "deit_tiny", "--data.init_args.train_size=128", "--data.init_args.val_size=32"),
    *("--data.init_args.batch_size=32", "--trainer.max_epochs=2", f"--resume.every_n_train_steps={EVERY}"),
]
STEPS = 8  # 4 an epoch
EPOCH_END = 4  # the checkpoint before the faults below: the first epoch's end, after its validation


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    zoo_fit(root, *RUN)
    assert last_checkpoint(root)["global_step"] == STEPS
    return root


def fault(name: str, **arguments) -> list[str]:
    return [
        f"--trainer.callbacks+=tests.resume.faults.{name}",
        *(f"--trainer.callbacks.{key}={value}" for key, value in arguments.items()),
    ]


def test_sigterm_saves_the_step_exits_cleanly_and_resumes(reference, tmp_path):
    done = zoo_fit(tmp_path, *RUN, *fault("SignalAtStep", step=5, signal="SIGTERM"), expect=0)
    assert last_checkpoint(tmp_path)["global_step"] == 5  # saved at the step it was told to stop: none lost
    assert "SIGTERM: saved" in done.stdout + done.stderr
    zoo_fit(tmp_path, *RUN, "--ckpt_path", "last")
    assert_same_end(tmp_path, reference)


def test_sigusr1_saves_and_training_goes_on(tmp_path):
    done = zoo_fit(
        tmp_path, *RUN, "--resume.every_n_train_steps=0", *fault("SignalAtStep", step=2, signal="SIGUSR1")
    )
    assert "SIGUSR1: saved" in done.stdout + done.stderr
    assert last_checkpoint(tmp_path)["global_step"] == STEPS


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(reference, tmp_path):
    """The save at step 6 fails half-written (ENOSPC): the run stops, last.ckpt is still step 4's."""
    done = zoo_fit(tmp_path, *RUN, *fault("DiskFullAtStep", step=5), expect=1)
    assert "No space left on device" in done.stderr
    assert last_checkpoint(tmp_path)["global_step"] == EPOCH_END
    assert not list(tmp_path.rglob("*.partial")), "a failed write leaves no temporary file behind"
    zoo_fit(tmp_path, *RUN, "--ckpt_path", "last")
    assert_same_end(tmp_path, reference)


def test_a_kill_between_write_and_rename_keeps_the_previous_checkpoint(reference, tmp_path):
    zoo_fit(tmp_path, *RUN, *fault("DiskFullAtStep", step=5, kill="true"), expect=-9)
    assert last_checkpoint(tmp_path)["global_step"] == EPOCH_END
    assert list(tmp_path.rglob(".last.ckpt.*.partial")), "the kill landed after the write, before the rename"
    zoo_fit(tmp_path, *RUN, "--ckpt_path", "last")
    assert not list(tmp_path.rglob("*.partial")), "the next save clears what the killed one left"
    assert_same_end(tmp_path, reference)


def zoo(*args: str, cwd) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "zoo", *args, "--trainer.enable_progress_bar=false"]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_clear_error(done: subprocess.CompletedProcess, *phrases: str) -> None:
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    for phrase in phrases:
        assert phrase in done.stderr, f"{phrase!r} not in: {done.stderr[-2000:]}"


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict"])
def test_truncated_and_corrupt_checkpoints_get_an_error_naming_the_file(subcommand, reference, tmp_path):
    good = find_last_checkpoint(reference).read_bytes()
    truncated, corrupt = tmp_path / "truncated.ckpt", tmp_path / "corrupt.ckpt"
    truncated.write_bytes(good[: len(good) // 3])
    corrupt.write_bytes(bytes(reversed(good[:4096])))
    for path in (truncated, corrupt):
        done = zoo(subcommand, *RUN[:2], "--ckpt_path", str(path), cwd=REPO_ROOT)
        assert_clear_error(done, str(path), "not a readable checkpoint")


def test_another_models_checkpoint_gets_an_error_naming_both(tmp_path):
    other = tmp_path / "esm2.ckpt"
    hyper_parameters = {"_class_path": "zoo.protein.ESM2MaskedLM", "model_name": "esm2_t6_8M"}
    torch.save({"hyper_parameters": hyper_parameters, "state_dict": {}}, other)
    done = zoo("validate", "--config", "deit_tiny", "--ckpt_path", str(other), cwd=REPO_ROOT)
    assert_clear_error(done, str(other), "ESM2MaskedLM", "ImageClassifier")


def test_ckpt_path_last_without_a_run_says_there_is_nothing_to_resume(tmp_path):
    done = zoo(
        "fit",
        "--config",
        "deit_tiny",
        "--ckpt_path",
        "last",
        f"--trainer.default_root_dir={tmp_path}",
        cwd=REPO_ROOT,
    )
    assert_clear_error(done, "--ckpt_path last", "no run under")
