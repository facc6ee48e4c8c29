"""``MultitaskModule``'s arguments before it took ``model_name`` + ``model_kwargs``, under today's names.

Those checkpoints saved every architecture argument (``d_model`` ... ``dropout``) as a hyper-parameter of its
own; ``upgrade_architecture_arguments`` moves them into ``model_kwargs`` over the ``multitask_small`` preset (the
constructor's defaults of that time). ``MultitaskModule.upgrade_hyperparameters`` applies it, so
``load_from_checkpoint`` and ``zoo test --ckpt_path`` read old checkpoints directly and ``zoo upgrade-checkpoint``
rewrites one. The network's state-dict keys did not change.
"""

from __future__ import annotations

from typing import Any

from zoo.multitask.model import PRESETS

__all__ = ["upgrade_architecture_arguments"]

#: the preset holding the architecture defaults old checkpoints were written with
OLD_DEFAULTS = "multitask_small"


def upgrade_architecture_arguments(old: dict[str, Any]) -> dict[str, Any]:
    """Hyper-parameters whose architecture arguments are ``model_name`` + ``model_kwargs`` (only the values
    that differ from the preset). Current hyper-parameters come back unchanged."""
    hparams = dict(old)
    preset = PRESETS[OLD_DEFAULTS]
    architecture = {key: hparams.pop(key) for key in preset if key in hparams}
    if not architecture:
        return hparams
    overrides = {key: value for key, value in architecture.items() if value != preset[key]}
    hparams["model_name"] = OLD_DEFAULTS
    hparams["model_kwargs"] = overrides or None
    return hparams
