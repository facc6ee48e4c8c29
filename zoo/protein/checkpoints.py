"""Upgrade Lightning checkpoints of the protein modules written before the ``model_name`` / ``model_kwargs``
arguments.

Those checkpoints name the architecture with ``size`` (``"t6_8M"``) and the overrides ``num_layers`` /
``embed_dim`` / ``attention_heads``; ``load_from_checkpoint`` passes saved hyper-parameters back to
``__init__``, which no longer takes them. The network's state-dict keys did not change, so renaming the
hyper-parameters is all an old checkpoint needs::

    checkpoint = torch.load("old.ckpt", weights_only=False)
    torch.save(upgrade_checkpoint(checkpoint), "new.ckpt")
    model = ESM2MaskedLM.load_from_checkpoint("new.ckpt")

(``fit --ckpt_path old.ckpt`` resumes without it: resuming reads the weights, not the hyper-parameters.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from zoo.protein.model import preset_name

__all__ = ["upgrade_checkpoint", "upgrade_hyperparameters"]

#: the hyper-parameters that overrode the size preset field by field
ARCHITECTURE_OVERRIDES = ("num_layers", "embed_dim", "attention_heads")


def upgrade_hyperparameters(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """``size`` -> ``model_name`` (the published preset name), the set overrides -> ``model_kwargs``, every
    other entry as it was (in its place). Current hyper-parameters come back unchanged."""
    if "size" not in hparams:
        return dict(hparams)
    overrides = {key: hparams[key] for key in ARCHITECTURE_OVERRIDES if hparams.get(key) is not None}
    upgraded: dict[str, Any] = {}
    for key, value in hparams.items():
        if key == "size":
            upgraded["model_name"] = preset_name(value)
            upgraded["model_kwargs"] = overrides or None
        elif key not in ARCHITECTURE_OVERRIDES:
            upgraded[key] = value
    return upgraded


def upgrade_checkpoint(old: dict[str, Any]) -> dict[str, Any]:
    """A copy of the checkpoint ``old`` (as ``torch.load`` returns it) with its hyper-parameters upgraded."""
    new = dict(old)
    if "hyper_parameters" in old:
        new["hyper_parameters"] = upgrade_hyperparameters(old["hyper_parameters"])
    return new
