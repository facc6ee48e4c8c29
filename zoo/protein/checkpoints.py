"""The protein modules' arguments before ``model_name`` / ``model_kwargs``, under today's names.

Those checkpoints name the architecture with ``size`` (``"t6_8M"``) and the overrides ``num_layers`` /
``embed_dim`` / ``attention_heads``. The network's state-dict keys did not change, so this mapping is all an old
checkpoint needs: the modules' ``upgrade_hyperparameters`` apply it, so ``load_from_checkpoint`` reads old
checkpoints directly and ``zoo upgrade-checkpoint old.ckpt new.ckpt`` rewrites one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from zoo.protein.model import preset_name

__all__ = ["OldSizeArguments", "upgrade_lora_arguments", "upgrade_size_arguments"]

#: the hyper-parameters that overrode the size preset field by field
ARCHITECTURE_OVERRIDES = ("num_layers", "embed_dim", "attention_heads")


def upgrade_size_arguments(hparams: Mapping[str, Any]) -> dict[str, Any]:
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


#: the fine-tuners' LoRA arguments before ``lora: LoRAConfig`` (and their defaults then)
OLD_LORA_ARGUMENTS = {"lora_rank": 0, "lora_alpha": 16.0, "lora_dropout": 0.0}


def upgrade_lora_arguments(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """``lora_rank`` / ``lora_alpha`` / ``lora_dropout`` -> ``lora`` (a ``LoRAConfig``'s fields, ``None`` for rank
    0), in the place of ``lora_rank``. Current hyper-parameters come back unchanged."""
    if "lora_rank" not in hparams:
        return dict(hparams)
    old = {key: hparams.get(key, default) for key, default in OLD_LORA_ARGUMENTS.items()}
    lora = None
    if old["lora_rank"]:
        lora = {
            "rank": old["lora_rank"],
            "alpha": old["lora_alpha"],
            "dropout": old["lora_dropout"],
            "targets": None,
        }
    upgraded: dict[str, Any] = {}
    for key, value in hparams.items():
        if key == "lora_rank":
            upgraded["lora"] = lora
        elif key not in OLD_LORA_ARGUMENTS:
            upgraded[key] = value
    return upgraded


class OldSizeArguments:
    """Mixin of the protein modules: checkpoints written with ``size`` (and the fine-tuners' flat LoRA
    arguments) load (``ZooModule`` calls this hook)."""

    @classmethod
    def upgrade_hyperparameters(cls, hparams: dict) -> dict:
        return upgrade_lora_arguments(upgrade_size_arguments(hparams))
