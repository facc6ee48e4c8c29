"""What a compressed model needs to be rebuilt: architecture records carried in its checkpoint.

A state dict holds tensors, not shapes of the modules that take them: a model with pruned heads, int8
``Linear`` layers or a k-means codebook cannot load its own state dict into a freshly built float model.
Every compression step therefore appends a *record* (plain lists, dicts, strings and ints, so the
checkpoint still loads with ``weights_only=True``) to ``module._zoo_compression``; the callbacks write the
list into ``checkpoint["zoo_compression"]``, and :func:`replay` applies the records in order to a freshly
built model before the state dict is loaded. Lightning calls the module's ``on_load_checkpoint`` before it
loads the state dict, and a callback's ``setup`` before both, so :func:`install_restore_hook` (called from
every compression callback's ``setup``) makes ``zoo validate/test/predict --ckpt_path`` and resumed fits
rebuild the compressed architecture first. :func:`load_compressed` does the same from plain Python.
"""

from __future__ import annotations

import io
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "CHECKPOINT_KEY",
    "add_record",
    "install_restore_hook",
    "load_compressed",
    "records_of",
    "register_replay",
    "replay",
    "size_observers_like",
    "state_dict_bytes",
]

CHECKPOINT_KEY = "zoo_compression"
_ATTRIBUTE = "_zoo_compression"
_REPLAYS: dict[str, Callable[[nn.Module, dict], None]] = {}


def register_replay(kind: str) -> Callable:
    """Decorator: ``fn(module, record)`` rebuilds the architecture change a record of ``kind`` describes."""

    def wrap(fn: Callable[[nn.Module, dict], None]) -> Callable[[nn.Module, dict], None]:
        _REPLAYS[kind] = fn
        return fn

    return wrap


def records_of(module: nn.Module) -> list[dict]:
    return module.__dict__.setdefault(_ATTRIBUTE, [])


def add_record(module: nn.Module, record: dict) -> None:
    if "kind" not in record:
        raise ValueError("a compression record needs a 'kind'")
    records_of(module).append(record)


def replay(module: nn.Module, records: list[dict]) -> None:
    """Apply the recorded architecture changes to a freshly built ``module`` (weights come from a state dict)."""
    if records_of(module):
        raise RuntimeError(
            "this module is already compressed; replay compression records on a freshly built model only"
        )
    _apply(module, records)


def _apply(module: nn.Module, records: list[dict]) -> None:
    from zoo.callbacks.compression import gptq, quantization, structured, weight_sharing  # noqa: F401 (registry)

    for index, record in enumerate(records):
        kind = record.get("kind")
        if kind not in _REPLAYS:
            raise ValueError(f"compression record {index} has kind {kind!r}; known kinds: {sorted(_REPLAYS)}")
        _REPLAYS[kind](module, record)
        add_record(module, record)


def install_restore_hook(pl_module: nn.Module) -> None:
    """Make ``pl_module.on_load_checkpoint`` replay the checkpoint's records before Lightning loads the weights,
    and ``pl_module.on_save_checkpoint`` write them.

    Installed on the instance (like ``Distillation`` swaps ``training_step``), chained to the class's own
    hooks, and idempotent, so several compression callbacks can all call it. The module's hook (not only the
    callbacks') writes the records because ``save_checkpoint(weights_only=True)`` skips callback hooks.
    """
    if getattr(pl_module, "_zoo_restore_hook", False):
        return
    original = pl_module.on_load_checkpoint
    original_save = pl_module.on_save_checkpoint

    def on_save_checkpoint(self: nn.Module, checkpoint: dict[str, Any]) -> None:
        original_save(checkpoint)
        save_records(self, checkpoint)

    def on_load_checkpoint(self: nn.Module, checkpoint: dict[str, Any]) -> None:
        records = checkpoint.get(CHECKPOINT_KEY) or []
        done = records_of(self)
        # A fit resumed from a checkpoint runs the callbacks' ``setup`` first, and Lightning sets
        # ``trainer.ckpt_path`` only after it: the callbacks then compressed the fresh model as the
        # checkpoint's was (pruned it, prepared QAT). Only the records beyond theirs are replayed.
        if records and records[: len(done)] == done:
            _apply(self, records[len(done) :])
            size_observers_like(self, checkpoint.get("state_dict") or {})
        original(checkpoint)

    pl_module.on_load_checkpoint = types.MethodType(on_load_checkpoint, pl_module)
    pl_module.on_save_checkpoint = types.MethodType(on_save_checkpoint, pl_module)
    pl_module._zoo_restore_hook = True


def save_records(pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Write the module's records into a checkpoint being saved (every compression callback calls this)."""
    records = records_of(pl_module)
    if records:
        checkpoint[CHECKPOINT_KEY] = [dict(r) for r in records]


def load_compressed(module: nn.Module, checkpoint: str | Path | dict) -> nn.Module:
    """Rebuild a compressed model from a checkpoint written with compression callbacks, from plain Python.

    ``module`` is a freshly built model of the original (uncompressed) configuration, e.g.
    ``ImageClassifier(**ckpt["hyper_parameters"])``; loading is ``weights_only``.
    """
    if not isinstance(checkpoint, dict):
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    replay(module, checkpoint.get(CHECKPOINT_KEY) or [])
    state = checkpoint.get("state_dict", checkpoint)
    size_observers_like(module, state)
    module.load_state_dict(state)
    return module


def size_observers_like(module: nn.Module, state: dict[str, Any]) -> None:
    """Give the buffers of replayed ``torch.ao`` observers and fake-quantizers the shapes they have in ``state``.

    Their statistics are sized by what they observed: a per-channel observer's ``min_val`` is empty and a
    fake-quantizer's ``scale`` one element until the first batch. PyTorch resizes them when the state dict
    loads, but the zoo's check of a checkpoint against the model (``zoo.checkpointing``) compares shapes
    first, so a QAT fit resumed from its checkpoint would be refused.
    """
    try:  # only checkpoints of the pre-torchao path (legacy.py) hold observers
        from torch.ao.quantization import FakeQuantizeBase
        from torch.ao.quantization.observer import ObserverBase
    except ImportError:
        return
    for name, child in module.named_modules():
        if not isinstance(child, (ObserverBase, FakeQuantizeBase)):
            continue
        prefix = f"{name}." if name else ""
        for buffer_name, buffer in child.named_buffers(recurse=False):
            saved = state.get(prefix + buffer_name)
            if isinstance(saved, torch.Tensor) and saved.shape != buffer.shape:
                buffer.resize_(saved.shape)


def state_dict_bytes(module: nn.Module) -> int:
    """Size of ``torch.save(module.state_dict())``: the model's size on disk."""
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.getbuffer().nbytes
