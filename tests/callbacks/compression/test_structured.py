"""Structured pruning removes heads, MLP units, blocks and conv channels for real, and pruned models reload."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zoo.callbacks.compression import (
    StructuredPruning,
    prune_attention_heads,
    prune_conv_channels,
    prune_transformer,
)
from zoo.callbacks.compression.structured import block_influence
from zoo.datamodules import ImageClassificationDataModule
from zoo.vision import ImageClassifier

from .helpers import TINY_DEIT, images, round_trip, tiny_deit


def _silence_head(attn: nn.Module, head: int) -> None:
    """Zero every weight of one head (q, k, v rows and proj columns): it then contributes nothing."""
    d, dim = attn.head_dim, attn.num_heads * attn.head_dim
    with torch.no_grad():
        for part in range(3):
            rows = slice(part * dim + head * d, part * dim + (head + 1) * d)
            attn.qkv.weight[rows] = 0
            if attn.qkv.bias is not None:
                attn.qkv.bias[rows] = 0
        attn.proj.weight[:, head * d : (head + 1) * d] = 0


def test_removing_silent_heads_and_units_leaves_outputs_unchanged():
    """Zeroed heads / MLP units have the lowest norm, are the ones removed, and removing them changes nothing."""
    model, x = tiny_deit(), images()
    for block in model.model.blocks:
        _silence_head(block.attn, 1)
        with torch.no_grad():
            block.mlp.fc2.weight[:, ::2] = 0  # half of the hidden units feed nothing
            block.mlp.fc1.weight[::2] = 0
            block.mlp.fc1.bias[::2] = 0
    expected = model(x)
    before = sum(p.numel() for p in model.parameters())
    record = prune_transformer(model, head_fraction=1 / 3, mlp_fraction=0.5, importance="l2")
    for index, block in enumerate(model.model.blocks):
        assert record["heads"][f"model.blocks.{index}.attn"] == [0, 2]
        assert record["mlp"][f"model.blocks.{index}.mlp"] == list(range(1, 768, 2))
        assert block.attn.num_heads == 2 and block.attn.qkv.out_features == 3 * 128
        assert block.attn.proj.in_features == 128
        assert block.mlp.fc1.out_features == 384 and block.mlp.fc2.in_features == 384
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    after = sum(p.numel() for p in model.parameters())
    assert after < 0.6 * before


def test_pruned_model_saves_and_reloads_with_identical_outputs():
    model, x = tiny_deit(), images()
    prune_transformer(model, head_fraction=1 / 3, mlp_fraction=0.5)
    reloaded = round_trip(model, tiny_deit(seed=5))
    torch.testing.assert_close(reloaded(x), model(x), atol=0, rtol=0)


def test_layer_dropping_removes_the_least_influential_block():
    model, x = tiny_deit(depth=3), images()
    with torch.no_grad():  # block 1 becomes the identity: zero residual branches, zero influence
        model.model.blocks[1].attn.proj.weight.zero_()
        model.model.blocks[1].attn.proj.bias.zero_()
        model.model.blocks[1].mlp.fc2.weight.zero_()
        model.model.blocks[1].mlp.fc2.bias.zero_()
    influence = block_influence(model, "model.blocks", [x])
    assert influence[1] < 1e-6 < influence[0]
    expected = model(x)
    record = prune_transformer(model, drop_layers=1, calibration_inputs=[x])
    assert record["blocks"] == {"container": "model.blocks", "keep": [0, 2]}
    assert len(model.model.blocks) == 2
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(round_trip(model, tiny_deit(depth=3))(x), model(x), atol=0, rtol=0)


def test_head_pruning_rejects_removing_every_head():
    with pytest.raises(ValueError, match="between 1 and 3"):
        prune_attention_heads(tiny_deit().model.blocks[0].attn, [])


def test_conv_channels_are_removed_with_their_coupled_layers():
    """ResNet: torch_pruning shrinks convs, BatchNorms and residual partners together; reload is exact."""
    torch.manual_seed(0)
    model = ImageClassifier(model_name="resnet18").eval()
    x = images(2)
    before = sum(p.numel() for p in model.parameters())
    prune_conv_channels(model, x[:1], fraction=0.5)
    assert model.model.conv1.out_channels == 32 and model.model.fc.in_features == 256
    after = sum(p.numel() for p in model.parameters())
    assert after < 0.35 * before
    torch.manual_seed(1)
    reloaded = round_trip(model, ImageClassifier(model_name="resnet18"))
    torch.testing.assert_close(reloaded(x), model(x), atol=0, rtol=0)


def test_callback_prunes_before_fitting_and_checkpoint_validates(tmp_path, make_trainer):
    """Taylor importance on training batches, fine-tune, checkpoint; ``validate(ckpt_path)`` rebuilds the model."""
    data = ImageClassificationDataModule(train_size=64, val_size=32, test_size=32, batch_size=16)
    model = ImageClassifier(**TINY_DEIT)
    callback = StructuredPruning(
        head_fraction=1 / 3, mlp_fraction=0.5, importance="taylor", calibration_batches=2
    )
    trainer = make_trainer(callbacks=[callback], max_steps=2, limit_val_batches=1)
    trainer.fit(model, datamodule=data)
    assert model.model.blocks[0].attn.num_heads == 2
    assert callback.report["ratio"] < 0.65
    path = tmp_path / "pruned.ckpt"
    trainer.save_checkpoint(path)

    fresh = ImageClassifier(**TINY_DEIT)
    validator = make_trainer(callbacks=[StructuredPruning(head_fraction=1 / 3)], limit_val_batches=1)
    validator.validate(fresh, datamodule=data, ckpt_path=path)
    assert fresh.model.blocks[1].mlp.fc1.out_features == 384
    x = images(4)
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x), atol=0, rtol=0)
