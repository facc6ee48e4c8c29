"""A sharded FSDP2 checkpoint from 2 processes becomes one file that a single process loads, same outputs."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.distributed.runs import run
from tests.distributed.train_run import build_model
from zoo.checkpointing import CheckpointError, consolidate_checkpoint

pytestmark = pytest.mark.distributed


def test_fsdp2_checkpoint_consolidates_to_single_process_model(tmp_path):
    result = run(tmp_path, "vit", "fsdp2", 3, "--ckpt-every", "3")
    sharded = tmp_path / "checkpoints" / "epoch=0-step=3.ckpt"
    assert sharded.is_dir() and (sharded / ".metadata").is_file()  # really sharded, not one file

    output = tmp_path / "consolidated.ckpt"
    done = subprocess.run(
        [sys.executable, "-m", "zoo", "consolidate", str(sharded), str(output)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = torch.load(output, weights_only=True)
    assert checkpoint["global_step"] == 3
    assert len(checkpoint["optimizer_states"]) == 1 and checkpoint["optimizer_states"][0]["state"]

    model, _ = build_model("vit", fixed_masks=False)
    model.load_state_dict(checkpoint["state_dict"])  # strict: every key, every shape
    for name, value in model.state_dict().items():
        assert torch.equal(value, result["weights"][name]), name  # the full weights the 2 ranks trained

    reference, _ = build_model("vit", fixed_masks=False)
    reference.load_state_dict(result["weights"])
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    model.eval(), reference.eval()
    with torch.no_grad():
        assert torch.equal(model(images), reference(images))


def test_consolidate_rejects_what_is_not_a_sharded_directory(tmp_path):
    single = tmp_path / "one.ckpt"
    torch.save({"state_dict": {}}, single)
    with pytest.raises(CheckpointError, match=r"one\.ckpt: not a sharded checkpoint directory"):
        consolidate_checkpoint(single, tmp_path / "out.ckpt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CheckpointError, match=r"empty_dir: no `\.metadata` file"):
        consolidate_checkpoint(tmp_path / "empty_dir", tmp_path / "out.ckpt")
