"""Batch samplers that plan an epoch of batches up front, then give each DDP rank its share."""

from __future__ import annotations

from torch.utils.data import BatchSampler, DistributedSampler, Sampler

__all__ = ["EpochPlanBatchSampler"]


class EpochPlanBatchSampler(BatchSampler):
    """Subclasses say which batches an epoch holds (``epoch_batches``); this class shards them over ranks.

    Lightning re-creates a batch sampler around a ``DistributedSampler`` under DDP; its rank, world size and
    epoch (``set_epoch`` is called on it every epoch) are read here and its own index order is not used. Every
    rank builds the same global plan and takes every ``world``-th batch, the plan padded by repeating batches so
    that all ranks run the same number of steps.
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

    def __iter__(self):
        epoch, rank, world = self._placement()
        batches = self.epoch_batches(epoch)
        if world > 1 and batches:
            batches += batches[: (-len(batches)) % world]
            batches = batches[rank::world]
        yield from batches

    def __len__(self) -> int:
        _, _, world = self._placement()
        return -(-self.num_epoch_batches() // world)
