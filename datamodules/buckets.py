"""Aspect-ratio buckets: train on images of mixed shapes without squashing or cropping them square.

NovelAI's and SDXL's recipe: a fixed set of resolutions of about the same pixel count (``base_size``
squared), each side a multiple of ``step`` (the autoencoder's downsampling times the denoiser's, so every
latent divides evenly); each image goes to the bucket closest to its aspect ratio in log space, is resized
to cover it and centre-cropped, and every batch is drawn from one bucket, so its images share one shape.
"""

from __future__ import annotations

import math

import numpy as np
from torch.utils.data import Sampler

from zoo.datamodules.epoch_plans import EpochPlanBatchSampler

__all__ = ["BucketBatchSampler", "nearest_bucket", "resolution_buckets"]


def resolution_buckets(base_size: int, step: int, max_aspect_ratio: float = 2.0) -> list[tuple[int, int]]:
    """``(height, width)`` pairs, multiples of ``step``, with about ``base_size**2`` pixels, square included.

    For each width from the narrowest to the widest allowed, the tallest height that keeps the area within
    ``base_size**2`` is taken; shapes beyond ``max_aspect_ratio`` (either way) are left out.
    """
    if step < 1 or base_size < step or base_size % step:
        raise ValueError(f"base_size ({base_size}) must be a positive multiple of step ({step})")
    if max_aspect_ratio < 1:
        raise ValueError(f"max_aspect_ratio must be >= 1, got {max_aspect_ratio}")
    area = base_size * base_size
    buckets = {(base_size, base_size)}
    width = step
    while width <= area // step:
        height = (area // width) // step * step
        if height >= step and 1 / max_aspect_ratio <= width / height <= max_aspect_ratio:
            buckets.add((height, width))
        width += step
    return sorted(buckets, key=lambda hw: hw[1] / hw[0])


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is closest to ``width / height`` (log distance: 2:1 ~ 1:2)."""
    target = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][1] / buckets[i][0]) - target))


class BucketBatchSampler(EpochPlanBatchSampler):
    """Batches whose items all come from one bucket; every item is served once per epoch.

    Each epoch, each bucket's items are shuffled and cut into batches of ``batch_size`` (the last one of a
    bucket may be smaller, or is dropped with ``drop_last``), and the batches of all buckets are shuffled
    together; ``EpochPlanBatchSampler`` shards them over DDP ranks.
    """

    def __init__(
        self,
        sampler: Sampler,
        bucket_of: list[int] | np.ndarray,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler = sampler
        self.bucket_of = np.asarray(bucket_of, dtype=np.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        generator = np.random.default_rng([self.seed, epoch]) if self.shuffle else None
        batches = []
        for bucket in np.unique(self.bucket_of):
            items = np.flatnonzero(self.bucket_of == bucket)
            if generator is not None:
                items = generator.permutation(items)
            for start in range(0, len(items), self.batch_size):
                batch = items[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch.tolist())
        if generator is not None:
            batches = [batches[i] for i in generator.permutation(len(batches))]
        return batches

    def num_epoch_batches(self) -> int:
        return len(self.epoch_batches(0))
