"""Exact resume after a kill: where the data stood, what the random generators held, and a recent ``last.ckpt``.

Lightning restores weights, optimizers, schedulers, loops and callback states; three things it leaves open
are built here, and ``zoo fit`` adds them to every run (``zoo.cli``):

- ``ResumableDataLoader``: a ``DataLoader`` that records how many batches of the epoch were consumed and skips
  them on resume at the index level (no sample is loaded twice). Its order depends only on ``(seed, epoch)``,
  and every sample is loaded under generators seeded by ``(seed, epoch, index)``, so augmentations are the
  same after a resume, with any number of workers, as in the run that was killed. The zoo's own loader rather
  than torchdata's ``StatefulDataLoader``: that one snapshots worker and sampler states but draws
  augmentations from whatever the generators hold, so a resumed epoch is not the interrupted one, and it
  would be one more dependency; index-level skipping needs only samplers that are functions of the epoch,
  which every sampler in the zoo is (token budgets, resolution buckets, the multitask plan).
- ``ResumeState``: the torch / numpy / python generator states, restored right before the first resumed batch
  (model-side randomness: masking, dropout, noise).
- ``ResumeCheckpoint``: ``last.ckpt`` every ``every_n_train_steps`` optimizer steps, at every epoch's end (and
  after a validation inside an epoch), and when the job is told to stop (``SIGTERM``: save, then Lightning exits cleanly) or to save
  (``SIGUSR1``: save and go on). ``find_last_checkpoint`` is what ``zoo fit --ckpt_path last`` resumes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from weakref import proxy

import numpy as np
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, IterableDataset, RandomSampler

from zoo.checkpointing import _fsync_directory
from zoo.loggers import ResumableCSVLogger

__all__ = [
    "ResumableDataLoader",
    "ResumeCheckpoint",
    "ResumeState",
    "SeededSampler",
    "find_last_checkpoint",
]

LAST = "last.ckpt"
# Beside a sharded ``last.ckpt`` directory: the one being written, and the one being replaced (see ``_put_in_place``).
PARTIAL, PREVIOUS = f".{LAST}.partial", f".{LAST}.previous"


# ------------------------------------------------------------------------------------------ data order
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


def _mix(*values) -> int:
    """One 63-bit seed from several integers (splitmix64 steps): neighbouring indices get unrelated seeds.

    A key that is not an integer (the multitask ``(task, index)`` pairs) counts by a digest of its ``repr``:
    python's own ``hash`` of strings differs between processes."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        if not isinstance(value, int):
            value = int.from_bytes(hashlib.blake2b(repr(value).encode(), digest_size=8).digest(), "little")
        state = (state ^ (value & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return state >> 1


@contextlib.contextmanager
def seeded_generators(seed: int):
    """Run a block with torch, numpy and python generators seeded by ``seed``, then put their states back."""
    saved = torch.get_rng_state(), np.random.get_state(), random.getstate()
    torch.manual_seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(saved[0])
        np.random.set_state(saved[1])
        random.setstate(saved[2])


class SeededSamples:
    """A map-style dataset read with keys ``(epoch, index)``: each sample's augmentation draws from
    generators seeded by ``(seed, epoch, index)``, whichever process loads it and whenever."""

    def __init__(self, dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with seeded_generators(_mix(self.seed, epoch, index)):
            return self.dataset[index]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        if name.startswith("__"):  # keep DataLoader's ``__getitems__`` probe off the wrapped dataset
            raise AttributeError(name)
        return getattr(self.dataset, name)


class _Resumed:
    """The loader's index sampler (a sampler or batch sampler) with its first ``skip`` items dropped without
    loading anything, and, where samples are seeded, each index tagged with the epoch."""

    def __init__(self, sampler, skip: int, epoch: int | None) -> None:
        self.sampler, self.skip, self.epoch = sampler, skip, epoch

    def _tag(self, item):
        if isinstance(item, list):
            return [(self.epoch, index) for index in item]
        return (self.epoch, item)

    def __iter__(self):
        iterator = iter(self.sampler)
        for _ in range(self.skip):
            next(iterator, None)
        if self.epoch is None:
            return iterator
        return map(self._tag, iterator)

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose position within the epoch is checkpointed by Lightning and restored on resume.

    ``shuffle=True`` uses a ``SeededSampler(seed)``; under DDP Lightning swaps in its own ``DistributedSampler``
    seeded by ``seed_everything``, which is also ``seed``'s default, so a global batch holds the same samples
    on one process and on several. With ``seed_samples`` (the default, for map-style datasets) every sample is
    loaded under generators seeded by ``(seed, epoch, index)`` (``SeededSamples``), and the workers' base seed
    comes from ``(seed, epoch)``, not from the global generator. The position counts batches handed to the
    training loop; with ``num_workers > 0`` the skipped batches are never fetched either.
    """

    def __init__(
        self,
        dataset,
        *args: Any,
        shuffle: bool | None = None,
        seed: int | None = None,
        seed_samples: bool = True,
        **kwargs: Any,
    ) -> None:
        if seed is None:  # the seed Lightning gives its DistributedSampler: one order for 1 and N processes
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        if shuffle and kwargs.get("sampler") is None and kwargs.get("batch_sampler") is None and not args:
            kwargs["sampler"] = SeededSampler(len(dataset), seed=seed)
            shuffle = None
        seeded = seed_samples and not isinstance(dataset, IterableDataset)
        if seeded and not isinstance(dataset, SeededSamples):
            dataset = SeededSamples(dataset, seed)
        super().__init__(dataset, *args, shuffle=shuffle, **kwargs)
        self.seed, self._seeded = seed, seeded
        self._yielded = 0
        self._skip = 0  # batches to drop at the next iteration (set by load_state_dict)
        self._skipping = 0  # batches dropped by the current iteration

    def _epoch(self) -> int:
        """The epoch Lightning last gave the sampler (``set_epoch``), which defines this pass's order."""
        for sampler in (getattr(self.batch_sampler, "sampler", None), self.sampler):
            epoch = getattr(sampler, "epoch", None)
            if isinstance(epoch, int):
                return epoch
        return 0

    @property
    def _index_sampler(self):
        sampler = super()._index_sampler
        if not (self._skipping or self._seeded):
            return sampler
        return _Resumed(sampler, self._skipping, self._epoch() if self._seeded else None)

    def __iter__(self):
        self._skipping, self._skip = self._skip, 0
        self._yielded = self._skipping
        if self._seeded:  # workers' base seed from (seed, epoch): nothing drawn from the global generator
            self.generator = torch.Generator().manual_seed(_mix(self.seed, self._epoch()))
        return self._count(super().__iter__())

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
        return {"batches_yielded": self._yielded, "epoch": self._epoch()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Also gives the samplers the checkpoint's epoch: Lightning builds the resumed iterator (and fetches its
        first batch) before its own ``set_epoch`` call, which would otherwise come too late for that epoch."""
        self._skip = int(state["batches_yielded"])
        epoch = state.get("epoch")
        if self._skip >= len(self):  # saved at an epoch's end: the position is the next epoch's start
            self._skip, epoch = 0, None if epoch is None else epoch + 1
        if epoch is not None:
            _set_sampler_epoch(self, int(epoch))


# ------------------------------------------------------------------------------------------ RNG state
class ResumeState(Callback):
    """Checkpoints the generators' states and restores them just before the first resumed training batch.

    Not at load time: building the data iterator and fetching the first batch happen in between. Every rank
    is seeded alike by ``seed_everything`` and draws alike, so the saving rank's state serves all.
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

    def on_train_start(self, trainer, pl_module) -> None:
        """Gives the training loaders the checkpoint's position if Lightning has not.

        A module whose ``configure_optimizers`` reads ``trainer.estimated_stepping_batches`` (any schedule
        sized by the run: one-cycle, cosine with warmup) makes Lightning build the training loader before it
        restores the checkpoint; the loader's saved position is then never loaded and the resumed epoch would
        start from its first batch. Here the position is loaded and the iterator rebuilt before any batch.
        """
        loop = trainer.fit_loop
        states = getattr(loop, "_combined_loader_states_to_load", None)
        if not states or loop._combined_loader is None or loop._data_fetcher is None:
            return
        loop._combined_loader._load_state_dicts(states)
        loop._combined_loader_states_to_load = []
        iter(loop._data_fetcher)

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


# ------------------------------------------------------------------------------------------ last.ckpt
class ResumeCheckpoint(ModelCheckpoint):
    """``last.ckpt``, kept fresh enough that a kill loses at most ``every_n_train_steps`` optimizer steps.

    Saved every ``every_n_train_steps`` steps (``0``: only at epoch ends), at every epoch's end and after every
    validation inside an epoch, at the end of training, and at the end of the current step when
    the process receives ``SIGTERM`` (then Lightning stops the run and the process exits with status 0) or
    ``SIGUSR1`` (training goes on). Under several processes the ranks agree on the step to save at. Best-model
    checkpoints stay the job of a monitoring ``ModelCheckpoint`` in the config.

    Args:
        every_n_train_steps: optimizer steps between two saves of ``last.ckpt`` (the most a kill can lose);
            0 saves at epoch ends only.
        dirpath: where ``last.ckpt`` goes; by default the run's ``checkpoints/`` folder.
    """

    def __init__(self, every_n_train_steps: int = 200, dirpath: str | None = None) -> None:
        if every_n_train_steps < 0:
            raise ValueError(f"every_n_train_steps must be >= 0, got {every_n_train_steps}")
        super().__init__(
            dirpath=dirpath,
            save_last=True,
            save_top_k=0,
            every_n_train_steps=every_n_train_steps or None,
            enable_version_counter=False,
        )
        self._save_requested = threading.Event()
        self._previous_handler: Any = None
        self._steps_seen: int | None = None  # global_step at the previous batch end

    @property
    def state_key(self) -> str:
        return type(self).__name__

    # ---------------------------------------------------------------- signals
    def on_train_start(self, trainer, pl_module) -> None:
        """Cuts a resumed run's CSV log back to the checkpoint's step (the rows after it are logged again), and
        listens for ``SIGUSR1``: after Lightning's own handlers (SLURM's requeue), which this one then calls too."""
        self._steps_seen = trainer.global_step
        if trainer.ckpt_path is not None and trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, ResumableCSVLogger):
                    logger.rewind(trainer.global_step)
        if hasattr(signal, "SIGUSR1") and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGUSR1, self._on_sigusr1)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGUSR1, self._previous_handler)
            self._previous_handler = None
        super().teardown(trainer, pl_module, stage)

    def _on_sigusr1(self, signum, frame) -> None:
        self._save_requested.set()
        if callable(self._previous_handler):  # e.g. Lightning's SLURM requeue handler
            self._previous_handler(signum, frame)

    def _asked_to_save(self, trainer) -> bool:
        asked = self._save_requested.is_set() or trainer.received_sigterm
        if trainer.world_size > 1:  # one rank got the signal: every rank saves at this step
            asked = trainer.strategy.reduce_boolean_decision(asked, all=False)
        return asked

    # ---------------------------------------------------------------- saving
    def _fitting(self, trainer) -> bool:
        return (
            not trainer.fast_dev_run and not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING
        )

    def _save_last(self, trainer, reason: str | None = None) -> None:
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        if reason:
            rank_zero_info(
                f"{reason}: saved {self.last_model_path} at step {trainer.global_step}; "
                "`zoo fit ... --ckpt_path last` resumes from it"
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        """The interval's save (counted in optimizer steps, also under manual optimization) or a signal's."""
        asked = self._asked_to_save(trainer)
        crossed = self._crossed_interval(trainer)
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch or not self._fitting(trainer):
            return  # the epoch's last step is saved at the epoch's end, with the loops in their end state
        if asked:
            self._save_requested.clear()
            self._save_last(trainer, "SIGTERM" if trainer.received_sigterm else "SIGUSR1")
        elif crossed and self._last_global_step_saved != trainer.global_step:
            self._save_last(trainer)

    def _crossed_interval(self, trainer) -> bool:
        """Whether this batch's optimizer steps passed a multiple of the interval: a batch may take several
        (a GAN's generator and discriminator), so ``global_step`` can step over the multiple itself."""
        before, self._steps_seen = self._steps_seen, trainer.global_step
        every = self._every_n_train_steps
        return bool(every) and before is not None and trainer.global_step // every > before // every

    def on_validation_end(self, trainer, pl_module) -> None:
        """A validation inside the epoch (``val_check_interval < 1``); the epoch's last one is saved with it."""
        if self._fitting(trainer) and not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._save_last(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        """After validation and every other callback's epoch end (this one runs last): Lightning's own point for
        epoch checkpoints, so best-model callbacks have recorded the epoch's score in what is saved."""
        if self._fitting(trainer):
            self._save_last(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """A ``SIGTERM`` that arrived during validation or at an epoch's last step: save where the run is."""
        unsaved = self._last_global_step_saved != trainer.global_step
        if isinstance(exception, SIGTERMException) and unsaved and self._fitting(trainer):
            self._save_last(trainer, "SIGTERM")

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        """A checkpoint the strategy writes as a directory of shards (FSDP2, sharded FSDP, DeepSpeed) is written
        beside ``last.ckpt`` and put in its place once every rank has written its part.

        Those strategies write into an existing directory in place: a rank killed mid-save would leave new
        shards next to the old ones and the old metadata, a checkpoint of no step that may still load. Here
        rank 0 clears ``.last.ckpt.partial``, all ranks write into it, and rank 0 swaps it in
        (``_put_in_place``): a kill at any moment leaves the previous complete checkpoint to resume from.
        """
        if not isinstance(trainer.strategy, _DIRECTORY_STRATEGIES) or "://" in str(filepath):
            return super()._save_checkpoint(trainer, filepath)
        target = Path(filepath)
        partial = target.with_name(PARTIAL)
        if trainer.is_global_zero:
            _remove(partial)  # left by a save that was killed
        trainer.strategy.barrier("ResumeCheckpoint.clear")
        # Trainer.save_checkpoint ends with a barrier: every rank's shards are written when it returns
        trainer.save_checkpoint(str(partial), self.save_weights_only)
        if trainer.is_global_zero:
            _put_in_place(partial, target)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))


# may write a checkpoint as a directory; each also writes single files in some settings (``_put_in_place``)
_DIRECTORY_STRATEGIES = (ModelParallelStrategy, FSDPStrategy, DeepSpeedStrategy)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _put_in_place(written: Path, target: Path) -> None:
    """Move the complete checkpoint ``written`` (a file or directory) to ``target``, replacing what is there.

    A file replaces in one atomic ``os.replace``. A directory cannot replace another in one step: the old one
    is renamed to ``.last.ckpt.previous`` first, then ``written`` to ``target``, then the old one is removed;
    between the two renames ``find_last_checkpoint`` resumes the previous one. Everything is fsynced before
    it is moved: the new checkpoint is complete on disk before it replaces the old one.
    """
    for folder, _, files in os.walk(written) if written.is_dir() else ():
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_directory(Path(folder))
    previous = target.with_name(PREVIOUS)
    if target.is_dir() and not target.is_symlink():
        _remove(previous)
        os.replace(target, previous)
    elif written.is_dir() and (target.exists() or target.is_symlink()):
        target.unlink()  # a single file in the way: an earlier run of another strategy
    os.replace(written, target)
    _fsync_directory(target.parent)
    _remove(previous)


def find_last_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest ``last.ckpt`` (file, or sharded directory) under ``root``, by modification time; in a
    ``checkpoints`` folder whose sharded ``last.ckpt`` was being replaced when the run was killed (between
    the two renames of ``_put_in_place``), the complete previous one, ``.last.ckpt.previous``."""
    root = Path(root)
    if not root.is_dir():
        return None
    candidates = [path for path in root.rglob(LAST) if path.parent.name == "checkpoints"]
    candidates += [
        path
        for path in root.rglob(PREVIOUS)
        if path.parent.name == "checkpoints" and not (path.parent / LAST).exists()
    ]
    return max(candidates, key=lambda path: path.stat().st_mtime, default=None)
