"""Checkpoint files that survive crashes, name what is wrong with them, and merge from shards.

Exact resume (data position, generator states, ``last.ckpt``) is ``zoo.resume``.

What Lightning leaves open, and what is built here:

- ``AtomicCheckpointIO``. Lightning's ``_atomic_save`` serialises to memory and writes through an fsspec
  transaction; on a local disk fsspec stages the file in the system temp directory and ``shutil.move``\\ s it
  into place, which is a copy (not atomic) whenever ``/tmp`` is another file system, and nothing is fsynced.
  Here the temporary file is created next to the target, fsynced, and ``os.replace``\\ d over it (atomic on
  POSIX and Windows), then the directory is fsynced: a crash at any moment leaves the old file or the new
  one, never a truncated one. Loading names the file and what is wrong with it.
- ``consolidate_checkpoint`` (``zoo consolidate DIR OUT``): the sharded directory
  that FSDP2 / FSDP write (``torch.distributed.checkpoint`` format) becomes one ordinary ``.ckpt`` file that
  a single process loads (``Model.load_from_checkpoint``, ``zoo validate --ckpt_path``). Lightning's reader
  does the merging; this names the keys the way the Trainer loads them and writes atomically.
- ``check_checkpoint_matches``: a mismatched checkpoint (another model, another size) fails with the list
  of keys and shapes that differ, and the file's name.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from zoo.errors import ZooError

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointError",
    "atomic_torch_save",
    "check_checkpoint_matches",
    "consolidate_checkpoint",
]


class CheckpointError(ZooError):
    """A checkpoint that cannot be used: unreadable, truncated, or made for another model."""


# ------------------------------------------------------------------------------------------ atomic writes
def _fsync_directory(directory: Path) -> None:
    if os.name != "posix":  # Windows cannot open a directory; os.replace is durable there already
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in ``path``'s directory, fsync, then ``os.replace`` it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    for stale in path.parent.glob(f".{path.name}.*.partial"):  # left by a process killed before its rename
        stale.unlink(missing_ok=True)


def load_checkpoint_file(
    path: str | os.PathLike, map_location: Any = "cpu", weights_only: bool | None = None
):
    """``torch.load`` with errors that name the file and say what is wrong with it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as error:  # torch raises RuntimeError / pickle / EOF / zipfile errors for bad bytes
        size = path.stat().st_size if path.is_file() else 0
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({size} bytes; truncated or corrupt?): "
            f"{type(error).__name__}: {error}"
        ) from error
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(
            f"{path}: holds a {type(checkpoint).__name__}, expected a checkpoint dictionary"
        )
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with crash-safe local writes and load errors that name the file.

    Remote paths (``s3://`` and other fsspec URLs) go to Lightning's own writer, whose object-store upload
    is atomic already.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path)
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None):
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        location = map_location if map_location is not None else (lambda storage, loc: storage)
        return load_checkpoint_file(str(path).removeprefix("file://"), location, weights_only)


def check_checkpoint_matches(
    model_state: Mapping[str, torch.Tensor], checkpoint_state: Mapping[str, Any], source: str
) -> None:
    """Raise ``CheckpointError`` listing the missing, unexpected and differently shaped entries."""
    missing = [k for k in model_state if k not in checkpoint_state]
    unexpected = [k for k in checkpoint_state if k not in model_state]
    shapes = [
        f"{k}: checkpoint {tuple(checkpoint_state[k].shape)} vs model {tuple(model_state[k].shape)}"
        for k in model_state
        if k in checkpoint_state
        and hasattr(checkpoint_state[k], "shape")
        and hasattr(model_state[k], "shape")  # packed int8 weights are tuples, dtypes have no shape
        and tuple(checkpoint_state[k].shape) != tuple(model_state[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return

    def listing(title: str, items: list[str]) -> str:
        shown = ", ".join(items[:8]) + (f" ... ({len(items)} in all)" if len(items) > 8 else "")
        return f"\n  {title}: {shown}" if items else ""

    raise CheckpointError(
        f"{source} does not match the model"
        + listing("shape differs", shapes)
        + listing("missing from the checkpoint", missing)
        + listing("not in the model", unexpected)
    )


def consolidate_checkpoint(folder: str | os.PathLike, output: str | os.PathLike) -> dict[str, Any]:
    """Merge a sharded (distributed) checkpoint directory into one Trainer-loadable file; returns it.

    Needs the whole model and optimizer state in CPU memory once. FSDP1 stores the weights under ``model``,
    FSDP2 (``ModelParallelStrategy``) under ``state_dict``; optimizers are ``optimizer_0``, ``optimizer_1``...
    """
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder}: not a sharded checkpoint directory (a single file needs no consolidation)"
        )
    if not (folder / ".metadata").is_file():
        raise CheckpointError(f"{folder}: no `.metadata` file, not a torch.distributed.checkpoint directory")
    checkpoint = _load_distributed_checkpoint(folder)
    if "state_dict" not in checkpoint and "model" in checkpoint:
        checkpoint["state_dict"] = checkpoint.pop("model")
    optimizers = sorted((k for k in checkpoint if k.startswith("optimizer_")), key=lambda k: int(k[10:]))
    if optimizers:
        checkpoint["optimizer_states"] = [checkpoint.pop(k) for k in optimizers]
    atomic_torch_save(checkpoint, output)
    return checkpoint
