"""Crash-safe checkpoint writes and clear errors for unusable checkpoints (fast, one process)."""

from __future__ import annotations

import io

import pytest
import torch

from zoo import checkpointing
from zoo.checkpointing import (
    AtomicCheckpointIO,
    CheckpointError,
    check_checkpoint_matches,
)


def good_checkpoint() -> dict:
    return {"state_dict": {"weight": torch.arange(1000.0)}, "global_step": 7}


def test_save_then_load_round_trip(tmp_path):
    io_plugin = AtomicCheckpointIO()
    io_plugin.save_checkpoint(good_checkpoint(), tmp_path / "a" / "model.ckpt")
    loaded = io_plugin.load_checkpoint(tmp_path / "a" / "model.ckpt")
    assert loaded["global_step"] == 7 and torch.equal(loaded["state_dict"]["weight"], torch.arange(1000.0))
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["model.ckpt"]  # no temporary file left


def test_crash_while_writing_keeps_the_good_file(tmp_path, monkeypatch):
    """``torch.save`` dies after writing part of the bytes: the old file stays whole, no partial file remains."""
    target = tmp_path / "last.ckpt"
    io_plugin = AtomicCheckpointIO()
    io_plugin.save_checkpoint(good_checkpoint(), target)
    before = target.read_bytes()
    real_save = torch.save

    def dying_save(obj, handle, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # half the bytes reach the disk
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(checkpointing.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io_plugin.save_checkpoint({"state_dict": {"weight": torch.zeros(5000)}, "global_step": 8}, target)
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert io_plugin.load_checkpoint(target)["global_step"] == 7


def test_empty_file_is_named(tmp_path):
    path = tmp_path / "empty.ckpt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.ckpt: empty file \(0 bytes\)"):
        AtomicCheckpointIO().load_checkpoint(path)


def test_truncated_file_is_named(tmp_path):
    path = tmp_path / "cut.ckpt"
    AtomicCheckpointIO().save_checkpoint(good_checkpoint(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CheckpointError, match=rf"cut\.ckpt: not a readable checkpoint \({len(data) // 2} bytes"
    ):
        AtomicCheckpointIO().load_checkpoint(path)


def test_corrupt_bytes_are_named(tmp_path):
    path = tmp_path / "noise.ckpt"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(
        CheckpointError, match=r"noise\.ckpt: not a readable checkpoint.*truncated or corrupt"
    ):
        AtomicCheckpointIO().load_checkpoint(path)


def test_not_a_dictionary_is_named(tmp_path):
    path = tmp_path / "tensor.ckpt"
    torch.save(torch.ones(3), path)
    with pytest.raises(
        CheckpointError, match=r"tensor\.ckpt: holds a Tensor, expected a checkpoint dictionary"
    ):
        AtomicCheckpointIO().load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "nowhere.ckpt")


def test_mismatched_checkpoint_lists_every_difference():
    model = {
        "encoder.weight": torch.zeros(4, 8),
        "encoder.bias": torch.zeros(4),
        "head.weight": torch.zeros(2, 4),
    }
    saved = {
        "encoder.weight": torch.zeros(4, 16),
        "encoder.bias": torch.zeros(4),
        "extra.scale": torch.ones(1),
    }
    with pytest.raises(CheckpointError) as error:
        check_checkpoint_matches(model, saved, "run3/last.ckpt")
    message = str(error.value)
    assert message.startswith("run3/last.ckpt does not match the model")
    assert "encoder.weight: checkpoint (4, 16) vs model (4, 8)" in message
    assert "missing from the checkpoint: head.weight" in message
    assert "not in the model: extra.scale" in message
    assert "encoder.bias" not in message
    check_checkpoint_matches(model, dict(model), "same.ckpt")  # a matching one passes silently


def test_resuming_from_another_models_checkpoint_names_the_differences(tmp_path, tiny_image_data):
    import lightning as L

    from zoo.vision import ImageClassifier

    def trainer() -> L.Trainer:
        return L.Trainer(
            accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path,
        )  # fmt: skip

    def tiny(depth: int, dim: int) -> ImageClassifier:
        return ImageClassifier(
            "vit_tiny_patch16_224", patch_size=8, model_kwargs={"depth": depth, "embed_dim": dim}
        )

    first = trainer()
    first.fit(tiny(depth=2, dim=48), tiny_image_data)
    path = tmp_path / "two_blocks.ckpt"
    first.save_checkpoint(path)
    with pytest.raises(CheckpointError) as error:
        trainer().fit(tiny(depth=1, dim=96), tiny_image_data, ckpt_path=path)
    message = str(error.value)
    assert message.startswith(f"{path} does not match the model")
    assert "model.cls_token: checkpoint (1, 1, 48) vs model (1, 1, 96)" in message
    assert "not in the model: model.blocks.1." in message
