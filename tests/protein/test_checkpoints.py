"""Checkpoints written before ``model_name`` / ``model_kwargs`` load, directly and once upgraded."""

from __future__ import annotations

import pytest
import torch

from zoo.protein import ESM2MaskedLM, ESM2SequencePredictor
from zoo.protein.checkpoints import upgrade_lora_arguments, upgrade_size_arguments

TINY = {"num_layers": 2, "embed_dim": 32, "attention_heads": 2}
#: the architecture hyper-parameters as earlier versions saved them, for the same tiny model
OLD_ARCHITECTURE = {
    "size": "t6_8M",
    "num_layers": 2,
    "embed_dim": 32,
    "attention_heads": 2,
    "pretrained": None,
}


def _old_style_checkpoint(model, tmp_path, make_trainer) -> str:
    """``model``'s checkpoint with its hyper-parameters spelled as earlier versions wrote them."""
    trainer = make_trainer(max_epochs=0)
    trainer.strategy.connect(model)
    path = tmp_path / "new.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    rest = {
        k: v for k, v in checkpoint["hyper_parameters"].items() if k not in ("model_name", "model_kwargs")
    }
    checkpoint["hyper_parameters"] = {**OLD_ARCHITECTURE, **rest}
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    return str(old)


@pytest.mark.parametrize(
    ("module", "extra"),
    [(ESM2MaskedLM, {"mask_prob": 0.2}), (ESM2SequencePredictor, {"num_classes": 3, "pooling": "cls"})],
)
def test_an_old_checkpoint_loads_directly_and_once_upgraded(module, extra, tmp_path, make_trainer):
    model = module(model_kwargs=TINY, **extra)
    old = _old_style_checkpoint(model, tmp_path, make_trainer)
    upgraded = tmp_path / "upgraded.ckpt"
    torch.save(module.upgrade_checkpoint(torch.load(old, weights_only=False)), upgraded)
    assert "size" not in torch.load(upgraded, weights_only=True)["hyper_parameters"]
    for path in (old, upgraded):
        loaded = module.load_from_checkpoint(path)
        assert loaded.hparams.model_name == "esm2_t6_8M" and loaded.hparams.model_kwargs == TINY
        assert all(loaded.hparams[k] == v for k, v in extra.items())
        expected = model.state_dict()
        assert list(loaded.state_dict()) == list(expected)
        assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())


def test_hyperparameters_keep_their_order_and_unset_overrides_are_dropped():
    old = {"size": "t33_650M", "num_layers": None, "embed_dim": None, "attention_heads": None, "lora_rank": 4}
    assert list(upgrade_size_arguments(old).items()) == [
        ("model_name", "esm2_t33_650M"),
        ("model_kwargs", None),
        ("lora_rank", 4),
    ]
    current = {"model_name": "esm2_t6_8M", "model_kwargs": None, "mask_prob": 0.15}
    assert upgrade_size_arguments(current) == current


def test_flat_lora_arguments_become_one_lora_part():
    old = {
        "model_name": "esm2_t6_8M",
        "lora_rank": 4,
        "lora_alpha": 8.0,
        "lora_dropout": 0.1,
        "head_dropout": 0.1,
    }
    assert list(upgrade_lora_arguments(old).items()) == [
        ("model_name", "esm2_t6_8M"),
        ("lora", {"rank": 4, "alpha": 8.0, "dropout": 0.1, "targets": None}),
        ("head_dropout", 0.1),
    ]
    assert upgrade_lora_arguments({"lora_rank": 0, "lora_alpha": 16.0})["lora"] is None


def test_zoo_upgrade_checkpoint_rewrites_an_old_checkpoint(tmp_path, make_trainer, capsys):
    from zoo.commands import main

    model = ESM2MaskedLM(model_kwargs=TINY)
    old = _old_style_checkpoint(model, tmp_path, make_trainer)
    main(["upgrade-checkpoint", old, str(tmp_path / "new.ckpt"), "--model", "ESM2MaskedLM"])
    assert "zoo: wrote" in capsys.readouterr().out
    hparams = torch.load(tmp_path / "new.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["model_name"] == "esm2_t6_8M" and hparams["model_kwargs"] == TINY and "size" not in hparams
