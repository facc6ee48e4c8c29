"""The latent scale factor: ``1 / std`` of the first stage's latents, so the diffusion sees unit variance.

LDM's ``scale_by_std`` computes it from one batch, on rank 0 only (``@rank_zero_only``), and relies on
DDP's buffer broadcast; the constant 0.18215 that Stable Diffusion inherited is that number for one
autoencoder. Here every rank encodes its own share of several batches and the sums are all-reduced, so
all ranks agree on a value measured on ``world_size`` times more data; the module stores it in a
buffer, so it travels in every checkpoint and a resumed run samples with the same value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

__all__ = ["LatentMoments", "latent_scale_factor"]


class LatentMoments:
    """Running count, sum and sum of squares of latent values (float64, for a stable variance)."""

    def __init__(self) -> None:
        self.stats = torch.zeros(3, dtype=torch.float64)

    def update(self, latents: torch.Tensor) -> None:
        values = latents.detach().double().flatten().cpu()
        self.stats += torch.stack(
            [torch.tensor(float(values.numel()), dtype=torch.float64), values.sum(), values.pow(2).sum()]
        )

    def std(self, stats: torch.Tensor | None = None) -> float:
        n, total, squares = (stats if stats is not None else self.stats).tolist()
        if n < 2:
            raise ValueError("need at least two latent values to estimate their standard deviation")
        mean = total / n
        return max((squares - n * mean * mean) / (n - 1), 0.0) ** 0.5


def latent_scale_factor(
    encode: Callable[[dict], torch.Tensor],
    batches: Iterable[dict],
    num_batches: int,
    rank: int = 0,
    world_size: int = 1,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """``1 / std`` of ``encode(batch)`` over ``num_batches`` batches per rank, pooled over ranks.

    Rank ``r`` takes batches ``r, r + world_size, ...`` of ``batches`` (the same ordered loader on every
    rank), so the ranks see disjoint data; ``all_reduce_sum`` pools their moments.
    """
    moments = LatentMoments()
    taken = 0
    for index, batch in enumerate(batches):
        if taken >= num_batches:
            break
        if index % world_size != rank:
            continue
        moments.update(encode(batch))
        taken += 1
    if taken == 0:
        raise ValueError("the data gave no batches to estimate the latent scale factor from")
    stats = moments.stats if all_reduce_sum is None else all_reduce_sum(moments.stats.clone())
    std = moments.std(stats)
    if std == 0.0:
        raise ValueError(
            "the latents have zero variance: the autoencoder maps every image to the same latent"
        )
    return 1.0 / std
