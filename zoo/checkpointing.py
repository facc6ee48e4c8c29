"""Checkpoints that survive crashes and resume exactly.

What Lightning leaves open, and what is built here:

- ``AtomicCheckpointIO``. Lightning's ``_atomic_save`` serialises to memory and writes through an fsspec
  transaction; on a local disk fsspec stages the file in the system temp directory and ``shutil.move``\\ s it
  into place, which is a copy (not atomic) whenever ``/tmp`` is another file system, and nothing is fsynced.
  Here the temporary file is created next to the target, fsynced, and ``os.replace``\\ d over it (atomic on
  POSIX and Windows), then the directory is fsynced: a crash at any moment leaves the old file or the new
  one, never a truncated one. Loading names the file and what is wrong with it.
- ``ResumableDataLoader``. Lightning restores a loader's position mid-epoch only when the loader has
  ``state_dict``/``load_state_dict``; this one records how many batches of the epoch were consumed and skips
  them on resume at the index level (no sample is loaded twice). Its shuffling depends only on
  ``(seed, epoch)``, so the order after a resume is the order the interrupted run would have seen.
- ``ResumeState``. Lightning's checkpoints hold no random-number-generator state; a model that draws random
  numbers in ``training_step`` (ESM-2's masking, mixup, dropout) continues differently after a resume. This
  callback saves the torch / numpy / python generator states and puts them back right before the first
  resumed batch (not at load time: building the dataloader iterator draws from torch's generator in between).
- ``consolidate_checkpoint`` (``zoo consolidate DIR OUT``): the sharded directory
  that FSDP2 / FSDP write (``torch.distributed.checkpoint`` format) becomes one ordinary ``.ckpt`` file that
  a single process loads (``Model.load_from_checkpoint``, ``zoo validate --ckpt_path``). Lightning's reader
  does the merging; this names the keys the way the Trainer loads them and writes atomically.
- ``check_checkpoint_matches``: a mismatched checkpoint (another model, another size) fails with the list
  of keys and shapes that differ, and the file's name.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, RandomSampler

from zoo.errors import ZooError

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointError",
    "ResumableDataLoader",
    "ResumeState",
    "SeededSampler",
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


# ------------------------------------------------------------------------------------------ data position
class SeededSampler(RandomSampler):
    """A permutation drawn from ``(seed, epoch)`` alone (like ``DistributedSampler`` on one process).

    ``RandomSampler`` draws its seed from torch's global generator when the epoch starts, which a resumed
    run cannot reproduce; Lightning calls ``set_epoch`` at every epoch start. A ``RandomSampler`` subclass, so
    Lightning knows the loader shuffles and gives DDP ranks a shuffling ``DistributedSampler``.
    """

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True) -> None:
        super().__init__(range(size))
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.size))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class _SkipFirst:
    """An index sampler (batch sampler) whose first ``skip`` items are dropped without loading anything."""

    def __init__(self, sampler, skip: int) -> None:
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        iterator = iter(self.sampler)
        for _ in range(self.skip):
            next(iterator, None)
        return iterator

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose position within the epoch is checkpointed by Lightning and restored on resume.

    ``shuffle=True`` uses a ``SeededSampler(seed)``; under DDP Lightning swaps in its own ``DistributedSampler``
    seeded by ``seed_everything``, which is also ``seed``'s default, so a global batch holds the same samples
    on one process and on several. The position counts batches handed to the training loop; with
    ``num_workers > 0`` the skipped batches are never fetched either.
    """

    def __init__(
        self, dataset, *args: Any, shuffle: bool | None = None, seed: int | None = None, **kwargs: Any
    ) -> None:
        if seed is None:  # the seed Lightning gives its DistributedSampler: one order for 1 and N processes
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        if shuffle and kwargs.get("sampler") is None and kwargs.get("batch_sampler") is None and not args:
            kwargs["sampler"] = SeededSampler(len(dataset), seed=seed)
            shuffle = None
        super().__init__(dataset, *args, shuffle=shuffle, **kwargs)
        self._yielded = 0
        self._skip = 0  # batches to drop at the next iteration (set by load_state_dict)
        self._skipping = 0  # batches dropped by the current iteration

    @property
    def _index_sampler(self):
        sampler = super()._index_sampler
        return _SkipFirst(sampler, self._skipping) if self._skipping else sampler

    def __iter__(self):
        self._skipping, self._skip = self._skip, 0
        self._yielded = self._skipping
        iterator = super().__iter__()
        return self._count(iterator)

    def _count(self, iterator):
        for batch in iterator:
            self._yielded += 1
            yield batch
        self._skipping = 0

    def __len__(self) -> int:
        """The whole epoch's batch count, also while a resumed epoch skips its first batches.

        Lightning reads ``len()`` right after ``iter()`` and keeps it as ``num_training_batches`` for every
        later epoch; its batch counter resumes at the checkpoint's position, so the resumed epoch ends when
        the counter reaches the full length. A shortened length here would end every later epoch early.
        """
        skipping, self._skipping = self._skipping, 0
        try:
            return super().__len__()
        finally:
            self._skipping = skipping

    def state_dict(self) -> dict[str, int]:
        return {"batches_yielded": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = int(state["batches_yielded"])


# ------------------------------------------------------------------------------------------ RNG state
class ResumeState(Callback):
    """Checkpoints the generators' states and restores them just before the first resumed training batch.

    Every rank is seeded alike by ``seed_everything`` and draws alike, so the saving rank's state serves all.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        kind, keys, position, has_gauss, gauss = np.random.get_state()
        return {  # plain tensors, ints and tuples only, so ``torch.load(weights_only=True)`` reads it
            "torch": torch.get_rng_state(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        torch.set_rng_state(state["torch"])
        kind, keys, position, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
        random.setstate(state["python"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
