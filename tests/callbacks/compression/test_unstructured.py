"""Magnitude pruning on a cubic schedule: masks hold through optimizer steps, are made permanent, reported."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback
from torch import nn

from tests.callbacks.callback_testing import TinyClassifier, tiny_loader
from zoo.callbacks.compression import MagnitudePruning, cubic_sparsity, sparsity_report


def test_cubic_schedule_matches_zhu_and_gupta():
    assert cubic_sparsity(0, start=2, end=6, initial=0.0, target=0.8) == 0.0
    assert cubic_sparsity(2, 2, 6, 0.0, 0.8) == 0.0
    assert cubic_sparsity(4, 2, 6, 0.0, 0.8) == pytest.approx(0.8 * (1 - 0.5**3))
    assert cubic_sparsity(6, 2, 6, 0.0, 0.8) == cubic_sparsity(9, 2, 6, 0.0, 0.8) == 0.8


class MaskProbe(Callback):
    """After every optimizer step: the masked weights that the next forward uses, and the raw ``weight_orig``."""

    def __init__(self) -> None:
        self.steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        layer = pl_module.net[0]
        if hasattr(layer, "weight_mask"):
            with torch.no_grad():
                pl_module(batch[0])  # the forward pre-hook recomputes ``weight`` from orig * mask
            self.steps.append(
                (layer.weight_mask.clone(), layer.weight.detach().clone(), layer.weight_orig.detach().clone())
            )


def test_masks_hold_through_optimizer_steps_and_become_permanent(make_trainer):
    model, probe = TinyClassifier(), MaskProbe()
    pruning = MagnitudePruning(target_sparsity=0.6, start=0, end=4, frequency=2, unit="step", scope="layer")
    make_trainer(callbacks=[pruning, probe], max_steps=8).fit(model, tiny_loader())
    assert len(probe.steps) >= 6
    sparsities = [1 - mask.mean().item() for mask, _, _ in probe.steps]
    assert sparsities == sorted(sparsities) and sparsities[-1] == pytest.approx(0.6, abs=0.01)
    for mask, weight, _ in probe.steps:
        assert torch.all(weight[mask == 0] == 0)  # what the model computes with
    last_mask, _, last_orig = probe.steps[-1]
    assert (
        last_orig[last_mask == 0].abs().sum() > 0
    )  # AdamW kept moving the originals: the mask is what holds
    layer = model.net[0]
    assert not hasattr(layer, "weight_mask") and isinstance(layer.weight, nn.Parameter)
    assert torch.all(layer.weight[last_mask == 0] == 0)
    report = pruning.report
    assert report["layers"]["net.0"] == pytest.approx(0.6, abs=0.01)
    assert report["layers"]["net.3"] == pytest.approx(0.6, abs=0.05)


def test_global_scope_reaches_the_target_over_all_layers_and_skips_layers(make_trainer):
    model = TinyClassifier()
    pruning = MagnitudePruning(target_sparsity=0.5, start=0, end=1, unit="epoch", skip=["net.3"])
    make_trainer(callbacks=[pruning], max_epochs=2).fit(model, tiny_loader())
    report = sparsity_report(model)
    assert report["layers"]["net.3"] == 0.0
    assert report["layers"]["net.0"] == pytest.approx(0.5, abs=0.01)


def test_checkpoints_hold_permanent_weights(tmp_path, make_trainer):
    model = TinyClassifier()
    trainer = make_trainer(callbacks=[MagnitudePruning(target_sparsity=0.5, unit="step")], max_steps=2)
    trainer.fit(model, tiny_loader())
    trainer.save_checkpoint(tmp_path / "pruned.ckpt")
    state = torch.load(tmp_path / "pruned.ckpt", weights_only=True)["state_dict"]
    TinyClassifier().load_state_dict(state)  # plain keys: loads into the unpruned model
    assert (state["net.0.weight"] == 0).float().mean() >= 0.3


def test_bad_schedule_is_rejected():
    with pytest.raises(ValueError, match="target_sparsity"):
        MagnitudePruning(target_sparsity=1.2)
    with pytest.raises(ValueError, match="start <= end"):
        MagnitudePruning(start=3, end=1)
