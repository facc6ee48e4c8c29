"""The `zoo` front door: fast, quiet, configs by name, tools as subcommands, errors as one paragraph."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from zoo.commands import TOOLS

#: How Python and Lightning print a warning: "path/file.py:123: message" (Lightning's omit the category).
WARNING_LINE = re.compile(r"\.py:\d+: |Warning")


def zoo(*args: str, cwd, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("ZOO_DEBUG", None)
    command = [sys.executable, "-m", "zoo", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)


def test_help_and_list_answer_without_importing_torch_or_a_family(tmp_path):
    probe = (
        "import sys; from zoo.commands import main; main(['--help']); main(['list']); "
        "print(sorted(m for m in ('torch', 'lightning', 'zoo.vision', 'diffusers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("[]")
    assert "deit_tiny" in result.stdout and "vision/deit_tiny.yaml" in result.stdout
    for tool in TOOLS:
        assert tool in result.stdout
    assert not WARNING_LINE.search(result.stderr), result.stderr


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_every_tool_is_a_subcommand_with_help(tool, tmp_path):
    result = zoo(tool, "--help", cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"zoo {tool}" in result.stdout


def test_a_fit_by_model_name_from_another_folder_is_quiet(tmp_path):
    result = zoo("fit", "--config", "deit_tiny", "--trainer.fast_dev_run=true", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "zoo: fit done in" in result.stdout
    noise = [line for line in result.stderr.splitlines() if WARNING_LINE.search(line)]
    assert not noise, "\n".join(noise)


def _bad_fasta(folder):
    path = folder / "bad.fasta"
    path.write_text(">ok\nMKTAYIAK\n>broken\nMKT@@YIAK\n")
    return ["--config", "esm2_t6_8M", f"--data.init_args.fasta={path}"], "bad.fasta"


def _bad_info_file(folder):
    path = folder / "infos.json"
    path.write_text('{"infos": [{"token": "a"}]}')
    options = [f"--data.init_args.data_root={folder}", "--data.init_args.train_info=infos.json"]
    return ["--config", "bevformer_cpu", *options, "--data.init_args.val_info=infos.json"], "infos.json"


def _missing_task_folder(folder):
    return ["--config", "multitask_arithmetic", f"--data.init_args.data_dir={folder / 'tasks'}"], "tasks"


def _missing_image_folder(folder):
    return ["--config", "deit_tiny", f"--data.init_args.data_dir={folder / 'images'}"], "images"


def _corrupt_checkpoint(folder):
    path = folder / "model.ckpt"
    path.write_bytes(b"PK\x03\x04 not really a zip archive")
    return ["--config", "deit_tiny", f"--ckpt_path={path}"], "model.ckpt"


@pytest.mark.parametrize(
    ("command", "make_input"),
    [
        ("fit", _missing_image_folder),
        ("fit", _bad_fasta),
        ("fit", _bad_info_file),
        ("fit", _missing_task_folder),
        ("validate", _corrupt_checkpoint),
    ],
    ids=["image-folder", "fasta-record", "info-file", "task-folder", "checkpoint"],
)
def test_a_bad_input_is_one_paragraph_and_exit_status_2(command, make_input, tmp_path):
    args, named = make_input(tmp_path)
    result = zoo(command, *args, "--trainer.fast_dev_run=true", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (message,) = [line for line in result.stderr.splitlines() if line.startswith("zoo: error:")]
    assert named in message
    assert not (tmp_path / "runs").exists()  # a run that never started leaves no version folder behind
