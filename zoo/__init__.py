"""lightning-zoo: PyTorch Lightning models that each train from one YAML file.

Families live in sub-packages (``zoo.vision``...), data modules in ``zoo.datamodules`` and
reusable callbacks in ``zoo.callbacks``; ``zoo.list_models()`` lists what is registered.
"""

from zoo.registry import ModelEntry, list_models

__all__ = ["ModelEntry", "__version__", "list_models"]
__version__ = "0.1.0"
