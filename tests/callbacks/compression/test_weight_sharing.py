"""k-means weight sharing: K values per layer, centroids fine-tuned with fixed indices, saving reported, reload."""

from __future__ import annotations

import pytest
import torch

from tests.callbacks.callback_testing import TinyClassifier, tiny_loader
from zoo.callbacks.compression import WeightSharing, kmeans_1d, share_weights, storage_report

from .helpers import images, round_trip, tiny_deit


def test_kmeans_finds_well_separated_clusters():
    values = torch.cat([torch.full((50,), -2.0), torch.full((30,), 0.5), torch.full((20,), 3.0)])
    values = values + 0.01 * torch.randn(100, generator=torch.Generator().manual_seed(0))
    centroids, assignments = kmeans_1d(values, 3)
    torch.testing.assert_close(centroids, torch.tensor([-2.0, 0.5, 3.0]), atol=0.01, rtol=0)
    assert torch.bincount(assignments).tolist() == [50, 30, 20]


def test_centroids_are_fine_tuned_with_fixed_indices(make_trainer):
    model = TinyClassifier()
    callback = WeightSharing(clusters=4)
    trainer = make_trainer(callbacks=[callback], max_steps=6)
    trainer.strategy.connect(model)
    callback.setup(trainer, model, "fit")
    layer = model.net[0]
    codebook, indices = layer.weight_codebook.detach().clone(), layer.weight_indices.clone()
    trainer.fit(model, tiny_loader())
    assert torch.equal(layer.weight_indices, indices)
    assert not torch.allclose(layer.weight_codebook, codebook)  # the optimizer moved the shared values
    assert layer.weight.unique().numel() <= 4
    report = callback.report
    assert report["layers"]["net.0"]["unique"] <= 4
    weights = 8 * 16 + 16 * 4  # two 4-entry float codebooks + 2-bit indices against 32-bit floats
    assert report["ratio_packed"] == pytest.approx((2 * 4 * 32 + 2 * weights) / (32 * weights))


def test_shared_model_reports_storage_and_reloads():
    model, x = tiny_deit(), images()
    share_weights(model, clusters=16, skip=("model.head",))
    report = storage_report(model)
    assert "model.head" not in report["layers"]
    assert report["ratio_packed"] == pytest.approx(4 / 32, abs=0.01)  # 4-bit indices
    assert report["ratio_stored"] == pytest.approx(8 / 32, abs=0.01)  # stored as uint8
    torch.testing.assert_close(round_trip(model, tiny_deit(seed=4))(x), model(x), atol=0, rtol=0)
