"""Compression state that changes during training survives a resume from ``last.ckpt``: the masks of magnitude
pruning on a step schedule (the checkpoint's weights have them folded in) and quantization-aware training's
observers and fake quantizers (sized by what they saw)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from tests.resume.test_logged_epoch_values import Crash, Regression
from zoo.callbacks import MagnitudePruning, Quantization
from zoo.resume import ResumeCheckpoint, ResumeState, find_last_checkpoint


class Wider(Regression):
    def configure_models(self) -> None:
        self.model = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))


def fit(root, *callbacks, ckpt_path=None) -> Wider:
    L.seed_everything(0)
    model = Wider()
    trainer = L.Trainer(
        max_epochs=2,  # 20 steps
        logger=False,
        default_root_dir=root,
        callbacks=[
            ResumeCheckpoint(every_n_train_steps=7),
            ResumeState(),
            Quantization(mode="qat", save_path=None),  # before the pruning, which collects its layers
            MagnitudePruning(target_sparsity=0.6, start=2, end=14, frequency=3, unit="step"),
            *callbacks,
        ],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    return model


def test_pruning_masks_and_qat_observers_resume_exactly(tmp_path):
    full = fit(tmp_path / "full")
    with pytest.raises(RuntimeError, match="killed"):
        fit(tmp_path / "killed", Crash(step=9))
    saved = find_last_checkpoint(tmp_path / "killed")
    checkpoint = torch.load(saved, weights_only=True)
    assert checkpoint["global_step"] == 7  # mid-epoch, pruned at step 6; at 9, 12, 15 to come
    (masks,) = [
        s["masks"] for name, s in checkpoint["callbacks"].items() if name.startswith("MagnitudePruning")
    ]
    assert masks and all(mask.dtype == torch.bool and not mask.all() for mask in masks.values())
    resumed = fit(tmp_path / "killed", ckpt_path=saved)
    expected = full.state_dict()
    assert resumed.state_dict().keys() == expected.keys()
    for key, value in resumed.state_dict().items():  # converted int8 layers: packed params, scales
        assert same(value, expected[key]), key


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        if a.is_quantized:
            return (
                b.is_quantized
                and torch.equal(a.int_repr(), b.int_repr())
                and torch.equal(a.dequantize(), b.dequantize())
            )
        return torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b
