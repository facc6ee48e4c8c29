"""Checkpoints written before the zoo-wide argument names: their hyper-parameters, renamed.

``BEVFormerDetector`` took ``variant`` / ``config`` and ``BEVDetectionDataModule`` took ``image_size``; they
are now ``model_name`` / ``model_kwargs`` and ``img_size``. The network's state-dict keys did not change, so
only the hyper-parameters need upgrading before ``BEVFormerDetector.load_from_checkpoint``::

    torch.save(upgrade_checkpoint(torch.load("old.ckpt", weights_only=False)), "new.ckpt")
"""

from __future__ import annotations

import copy

__all__ = ["DATA_RENAMES", "MODEL_RENAMES", "upgrade_checkpoint"]

#: old -> new argument names of ``BEVFormerDetector``
MODEL_RENAMES = {"variant": "model_name", "config": "model_kwargs"}
#: old -> new argument names of ``BEVDetectionDataModule``
DATA_RENAMES = {"image_size": "img_size"}


def _renamed(hparams: dict, renames: dict[str, str]) -> dict:
    clashes = [old for old, new in renames.items() if old in hparams and new in hparams]
    if clashes:
        raise ValueError(
            f"hyper-parameters hold both old and new names: {[(o, renames[o]) for o in clashes]}"
        )
    return {renames.get(key, key): value for key, value in hparams.items()}


def upgrade_checkpoint(old: dict) -> dict:
    """``old`` (a Lightning checkpoint dict) with the module's and the data module's hyper-parameters renamed.

    A shallow copy: the state dict and optimizer states are shared with ``old``. Checkpoints already in the
    new form come back equal.
    """
    new = copy.copy(old)
    if "hyper_parameters" in old:
        new["hyper_parameters"] = _renamed(old["hyper_parameters"], MODEL_RENAMES)
    if "datamodule_hyper_parameters" in old:
        new["datamodule_hyper_parameters"] = _renamed(old["datamodule_hyper_parameters"], DATA_RENAMES)
    return new
