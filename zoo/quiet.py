"""Silence third-party noise that says nothing to a ``zoo`` user, each at its source, and nothing else.

Each filter names the message and why it is noise here; warnings about the user's own run stay.
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["silence_third_party_noise"]


class _DropMessages(logging.Filter):
    def __init__(self, *starts: str) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.starts)


def silence_third_party_noise() -> None:
    """Called by the ``zoo`` command before Lightning or a family is imported."""
    # Lightning advertises its cloud products at every fit ("💡 Tip: ... litlogger / litmodels").
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch"):
        logging.getLogger(name).addFilter(_DropMessages("💡 Tip"))
    # torchao, imported by diffusers, registers enums with torch's pytree and torch logs a deprecation for each;
    # diffusers then fails to import torchao classes it only needs for torchao-quantized diffusers checkpoints.
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").setLevel(logging.ERROR)
    # Lightning's own pytree helper uses an API torch deprecated; nothing a user can change.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # The zoo's data modules choose num_workers deliberately (embedded data are generated in memory, and on a
    # 2-core machine workers slow training down); the configs say so, Lightning's hint would not.
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
