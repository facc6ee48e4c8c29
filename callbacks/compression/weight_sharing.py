"""k-means weight sharing (Deep Compression, Han et al. 2016): each layer's weights become K shared values.

Each ``Linear``/``Conv`` weight is clustered (1-D k-means, linear initialisation between the min and max
weight, which Han et al. found best because it keeps the rare large weights) into a float codebook of
``K`` centroids and an index per weight (uint8 for K <= 256). As with ``torch.nn.utils.prune``, the layer's
``weight`` parameter is replaced by ``weight_codebook`` (a parameter) and ``weight_indices`` (a buffer), and a
forward pre-hook rebuilds ``weight = codebook[indices]`` before every forward. Autograd then gives each
centroid the sum of its weights' gradients, which is exactly Han et al.'s centroid fine-tuning; indices stay
fixed. ``storage_report`` gives the saving: ``K * 32 + n * ceil(log2 K)`` bits against ``32 n`` (bit-packed,
as Deep Compression counts it) and the bytes of the stored tensors (uint8 indices).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn

from zoo.callbacks.compression.records import (
    add_record,
    install_restore_hook,
    records_of,
    register_replay,
    save_records,
)

__all__ = ["WeightSharing", "kmeans_1d", "share_weights", "storage_report"]

SHAREABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def kmeans_1d(values: Tensor, clusters: int, iterations: int = 50) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means on a flat tensor with linear initialisation: ``(centroids (K,), assignments (n,))``.

    In 1-D each cluster is a contiguous range of the sorted values, bounded by the midpoints between sorted
    centroids: with the values sorted once and their prefix sums, one iteration is ``K`` binary searches
    instead of an ``n x K`` distance matrix.
    """
    values = values.detach().flatten().double()
    ordered, _ = torch.sort(values)
    prefix = torch.cat([ordered.new_zeros(1), torch.cumsum(ordered, 0)])
    centroids = torch.linspace(ordered[0].item(), ordered[-1].item(), clusters, dtype=torch.float64)
    for _ in range(iterations):
        centroids, _ = torch.sort(centroids)
        bounds = torch.searchsorted(ordered, (centroids[1:] + centroids[:-1]) / 2)
        edges = torch.cat([bounds.new_zeros(1), bounds, bounds.new_full((1,), len(ordered))])
        counts = (edges[1:] - edges[:-1]).double()
        sums = prefix[edges[1:]] - prefix[edges[:-1]]
        updated = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        converged = torch.allclose(updated, centroids, rtol=0, atol=1e-12)
        centroids = updated
        if converged:
            break
    centroids, _ = torch.sort(centroids)
    assignments = torch.bucketize(values, (centroids[1:] + centroids[:-1]) / 2)
    return centroids.float(), assignments


def _index_dtype(clusters: int) -> torch.dtype:
    return torch.uint8 if clusters <= 256 else torch.int16 if clusters <= 32768 else torch.int32


def _rebuild_weight(module: nn.Module, args: Any) -> None:
    module.weight = module.weight_codebook[module.weight_indices.long()].view(module.weight_shape)


def _attach(module: nn.Module, codebook: Tensor, indices: Tensor, shape: torch.Size, trainable: bool) -> None:
    del module._parameters["weight"]
    module.weight_shape = tuple(shape)
    module.register_parameter("weight_codebook", nn.Parameter(codebook, requires_grad=trainable))
    module.register_buffer("weight_indices", indices)
    module.register_forward_pre_hook(_rebuild_weight)
    _rebuild_weight(module, ())


def share_weights(
    model: nn.Module, clusters: int = 16, skip: tuple[str, ...] = (), train_centroids: bool = True
) -> dict:
    """Cluster every Linear/Conv weight not under ``skip`` into ``clusters`` shared values; in place."""
    if not 2 <= clusters <= 2**16:
        raise ValueError(f"clusters must be between 2 and 65536, got {clusters}")
    layers = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, SHAREABLE) or any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if "weight" not in module._parameters:
            continue  # already shared or pruned with masks
        weight = module.weight.detach()
        centroids, assignments = kmeans_1d(weight, clusters)
        _attach(
            module,
            centroids.to(weight.dtype),
            assignments.to(_index_dtype(clusters)).view(weight.shape),
            weight.shape,
            train_centroids,
        )
        layers[name] = {"clusters": clusters, "shape": list(weight.shape)}
    if not layers:
        raise ValueError("weight sharing found no Linear/Conv weight to cluster")
    record = {"kind": "weight_sharing", "layers": layers, "train_centroids": train_centroids}
    add_record(model, record)
    return record


@register_replay("weight_sharing")
def _replay_sharing(model: nn.Module, record: dict) -> None:
    for name, spec in record["layers"].items():
        module = model.get_submodule(name)
        shape = torch.Size(spec["shape"])
        device, dtype = module.weight.device, module.weight.dtype
        _attach(
            module,
            torch.zeros(spec["clusters"], device=device, dtype=dtype),
            torch.zeros(shape, dtype=_index_dtype(spec["clusters"]), device=device),
            shape,
            record["train_centroids"],
        )


def storage_report(model: nn.Module) -> dict:
    """Bits of the shared layers' weights: float32 original, bit-packed codebook + indices, and as stored."""
    original = packed = stored = 0
    layers = {}
    for name, module in model.named_modules():
        if not hasattr(module, "weight_codebook"):
            continue
        n, k = module.weight_indices.numel(), module.weight_codebook.numel()
        bits_original = 32 * n
        bits_packed = 32 * k + n * math.ceil(math.log2(k))
        bits_stored = 8 * (
            module.weight_indices.element_size() * n + module.weight_codebook.element_size() * k
        )
        layers[name] = {
            "ratio_packed": bits_packed / bits_original,
            "unique": int(module.weight.unique().numel()),
        }
        original, packed, stored = original + bits_original, packed + bits_packed, stored + bits_stored
    return {
        "layers": layers,
        "original_bytes": original // 8,
        "packed_bytes": packed // 8,
        "stored_bytes": stored // 8,
        "ratio_packed": packed / original if original else 1.0,
        "ratio_stored": stored / original if original else 1.0,
    }


class WeightSharing(Callback):
    """Share weights by k-means in ``setup("fit")``, then fine-tune the centroids during the fit.

    Clustering happens before Lightning builds the optimizer, so the optimizer trains the codebooks (when
    ``train_centroids``) and every other parameter as usual; the indices stay fixed. Checkpoints carry the
    codebooks, indices and a record that rebuilds the shared layers on load. ``report`` holds
    :func:`storage_report` at the end of fit.

    Args:
        clusters: shared values per layer (K; 16 = 4-bit indices).
        skip: module-name prefixes left unshared.
        train_centroids: fine-tune the codebooks (else they stay fixed: the fit trains the other parameters).
    """

    def __init__(
        self, clusters: int = 16, skip: list[str] | None = None, train_centroids: bool = True
    ) -> None:
        if not 2 <= clusters <= 2**16:
            raise ValueError(f"clusters must be between 2 and 65536, got {clusters}")
        self.clusters, self.skip, self.train_centroids = clusters, tuple(skip or ()), train_centroids
        self.report: dict = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        install_restore_hook(pl_module)
        shared = any(r["kind"] == "weight_sharing" for r in records_of(pl_module))
        if stage == "fit" and trainer.ckpt_path is None and not shared:
            share_weights(pl_module, self.clusters, self.skip, self.train_centroids)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.report = storage_report(pl_module)

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        save_records(pl_module, checkpoint)
