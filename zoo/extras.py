"""Optional features: an import that needs an extra says which one to install.

``pip install lightning-zoo`` brings what every family needs to train; these extras add the rest:

- ``compression``: torchao (int8 and int4 quantization) and torch-pruning (conv channel pruning);
- ``distributed``: DeepSpeed (``configs/strategy/deepspeed_*.yaml``);
- ``bev``: SciPy's Hungarian matching (BEVFormer's detection head);
- ``hf``: transformers, for Hugging Face formats (ESM-2 folders, a local CLIP text encoder in latent diffusion);
- ``streaming``: LitData, for ``zoo data optimize`` and data modules reading optimized (chunked) datasets;
- ``export``: onnx, onnxscript and onnxruntime, for ``zoo export --format onnx`` and its parity check;
- ``serve``: LitServe (and python-multipart for uploads), for ``zoo serve``;
- ``all``: every one of them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from zoo.errors import ZooError

__all__ = ["MissingExtraError", "require"]


class MissingExtraError(ZooError, ImportError):
    """An optional dependency is not installed."""


def require(module: str, extra: str, feature: str) -> ModuleType:
    """``importlib.import_module(module)``, or an error naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingExtraError(
            f"{feature} needs the {module.split('.')[0]!r} package, which is not installed: "
            f"pip install 'lightning-zoo[{extra}]'"
        ) from error
