"""Reusable Lightning callbacks, installed as ``zoo.callbacks``.

Interfaces a LightningModule offers so these callbacks work on it (every zoo family does):
- ``module.forward(batch_inputs)`` returns the prediction the loss is computed on.
- ``module.sharding_units``: the repeated block types, for FSDP2 / auto-wrap.
"""

__all__: list[str] = []
