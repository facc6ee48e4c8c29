"""Calibration data for the compression callbacks: a few batches from the trainer's loaders, and their inputs.

Static quantization, GPTQ, Taylor importance and layer dropping need real inputs. They take them from the
data the trainer already has (the data module's loaders, or the loaders given to ``fit``/``validate``),
call the model on ``batch[input_key]`` (dict batches) or ``batch[0]`` (tuples), as ``Distillation`` calls its
teacher, and get a loss through ``distillation_targets(batch) -> (logits, labels)`` (the interface in
``zoo.callbacks``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor

__all__ = ["batch_inputs", "calibration_batches", "run_with_layer_hooks", "supervised_loss"]


def batch_inputs(batch: Any, key: str = "image") -> Any:
    if isinstance(batch, dict):
        if key not in batch:
            raise KeyError(f"calibration batch has no {key!r} entry (keys: {sorted(batch)}); set input_key")
        return batch[key]
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def _loader(trainer: Trainer, split: str) -> Iterable | None:
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None:
        return getattr(datamodule, f"{split}_dataloader")()
    source = trainer.fit_loop._data_source if split == "train" else trainer.validate_loop._data_source
    if source.is_defined():
        return source.dataloader()
    loaders = trainer.val_dataloaders if split == "val" else trainer.train_dataloader
    return loaders


def calibration_batches(
    trainer: Trainer, pl_module: LightningModule, split: str, num_batches: int
) -> list[Any]:
    """The first ``num_batches`` batches of the ``split`` ("train" or "val") loader, on the module's device."""
    loader = _loader(trainer, split)
    if loader is None and split == "val":
        loader = _loader(trainer, "train")
    if loader is None:
        raise RuntimeError(
            f"compression calibration needs data: the trainer has no {split} dataloader (give a datamodule)"
        )
    if isinstance(loader, (list, tuple)):
        loader = loader[0]
    batches = [move_data_to_device(b, pl_module.device) for b in itertools.islice(iter(loader), num_batches)]
    if not batches:
        raise RuntimeError(f"the {split} dataloader yielded no batch for calibration")
    return batches


def supervised_loss(pl_module: LightningModule, batch: Any) -> Tensor:
    """Cross-entropy of ``distillation_targets(batch)``: what Taylor importance differentiates."""
    targets = getattr(pl_module, "distillation_targets", None)
    if not callable(targets):
        raise TypeError(
            f"{type(pl_module).__name__} has no distillation_targets(batch) -> (logits, labels), which gradient "
            "(Taylor) importance needs; use importance='l1' or 'l2'"
        )
    logits, labels = targets(batch)
    if isinstance(logits, (tuple, list)):
        return sum(F.cross_entropy(part, labels) for part in logits) / len(logits)
    return F.cross_entropy(logits, labels)


def run_with_layer_hooks(module: torch.nn.Module, layers: Iterable[str], hook: Callable[[str], Callable],
                         inputs: Iterable[Any]) -> None:  # fmt: skip
    """Call ``module`` on each of ``inputs`` (no grad) with ``hook(name)`` as a forward hook on each named layer,
    removed afterwards whatever happens: how static int8 and GPTQ see every layer's calibration inputs."""
    handles = [module.get_submodule(name).register_forward_hook(hook(name)) for name in layers]
    try:
        with torch.no_grad():
            for x in inputs:
                module(x)
    finally:
        for handle in handles:
            handle.remove()
