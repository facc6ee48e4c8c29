"""Batch samplers that plan an epoch of batches up front, then give each DDP rank its share."""

from __future__ import annotations

from collections.abc import Sized

from torch.utils.data import BatchSampler, DistributedSampler, Sampler

__all__ = ["EpochPlanBatchSampler", "one_process_sampler", "padded_to_multiple"]


def one_process_sampler(dataset: Sized) -> DistributedSampler:
    """The ``sampler`` to build an ``EpochPlanBatchSampler`` on: a one-replica ``DistributedSampler``.

    Lightning calls its ``set_epoch`` every epoch (so each epoch gets its own plan) and, under DDP, replaces
    it with a ``DistributedSampler`` of its own that says which rank this process is.
    """
    return DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=False)


def padded_to_multiple(batches: list, world: int) -> list:
    """``batches`` followed by repeats of its first ones (cycling) up to a multiple of ``world``."""
    if not batches:
        return batches
    return batches + [batches[i % len(batches)] for i in range(-len(batches) % world)]


class EpochPlanBatchSampler(BatchSampler):
    """Subclasses say which batches an epoch holds (``epoch_batches``); this class shards them over ranks.

    Lightning re-creates a batch sampler around a ``DistributedSampler`` under DDP; its rank, world size and
    epoch (``set_epoch`` is called on it every epoch) are read here and its own index order is not used. Every
    rank builds the same global plan and takes every ``world``-th batch, the plan padded by repeating batches so
    that all ranks run the same number of steps. A subclass whose ranks must also run matching batches at
    each step lays the plan out for the world size itself (``rank_batches`` and ``num_rank_batches``).
    """

    sampler: Sampler

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The whole epoch's batches, identical on every rank."""
        raise NotImplementedError

    def num_epoch_batches(self) -> int:
        """How many batches ``epoch_batches`` returns (the same every epoch)."""
        raise NotImplementedError

    def _placement(self) -> tuple[int, int, int]:
        """``(epoch, rank, world)`` from a (Lightning-injected) distributed sampler, else one process."""
        if isinstance(self.sampler, DistributedSampler):
            return self.sampler.epoch, self.sampler.rank, self.sampler.num_replicas
        return 0, 0, 1

    def rank_batches(self, epoch: int, world: int) -> list[list[int]]:
        """The epoch's plan laid out for ``world`` ranks: rank ``r`` runs the batches at ``r, r + world, ...``.

        By default the plan padded with its first batches to a multiple of ``world``.
        """
        return padded_to_multiple(self.epoch_batches(epoch), world)

    def num_rank_batches(self, world: int) -> int:
        """How many batches each of ``world`` ranks runs in an epoch."""
        return -(-self.num_epoch_batches() // world)

    def __iter__(self):
        epoch, rank, world = self._placement()
        yield from self.rank_batches(epoch, world)[rank::world]

    def __len__(self) -> int:
        _, _, world = self._placement()
        return self.num_rank_batches(world)
