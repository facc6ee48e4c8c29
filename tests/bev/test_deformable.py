"""Multi-scale deformable attention equals an explicit bilinear-sampling loop (the CUDA kernels' semantics)."""

from __future__ import annotations

import math

import pytest
import torch

from zoo.bev.deformable import MultiScaleDeformableAttention, multi_scale_deformable_attention


def bilinear(value: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """value (H, W, D) at normalised (x, y): pixel centres at (i + 0.5) / size, zero outside."""
    height, width, _ = value.shape
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(value.shape[-1], dtype=value.dtype)
    for dy in (0, 1):
        for dx in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            weight = (1 - abs(px - xi)) * (1 - abs(py - yi))
            if 0 <= xi < width and 0 <= yi < height:
                out += weight * value[yi, xi]
    return out


def reference_loop(value, shapes, locations, weights):
    batch, _, heads, dim = value.shape
    _, queries, _, _levels, points, _ = locations.shape
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(batch, queries, heads, dim, dtype=value.dtype)
    for b in range(batch):
        for q in range(queries):
            for h in range(heads):
                for lvl, (hh, ww) in enumerate(shapes):
                    level_map = value[b, starts[lvl] : starts[lvl + 1], h].view(hh, ww, dim)
                    for p in range(points):
                        x, y = locations[b, q, h, lvl, p].tolist()
                        out[b, q, h] += weights[b, q, h, lvl, p] * bilinear(level_map, x, y)
    return out.flatten(2)


def test_equals_explicit_bilinear_loop():
    torch.manual_seed(0)
    shapes = [(5, 7), (3, 4)]
    batch, queries, heads, dim, points = 2, 6, 2, 3, 3
    value = torch.randn(batch, sum(h * w for h, w in shapes), heads, dim, dtype=torch.float64)
    # include points outside the map and exactly on borders
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, dtype=torch.float64) * 1.4 - 0.2
    locations[0, 0, 0, 0, 0] = torch.tensor([0.0, 1.0])
    weights = torch.rand(batch, queries, heads, len(shapes), points, dtype=torch.float64)
    ours = multi_scale_deformable_attention(value, shapes, locations, weights)
    expected = reference_loop(value, shapes, locations, weights)
    assert torch.allclose(ours, expected, atol=1e-5, rtol=0)
    # float32 as used in training: within 1e-5 too
    ours32 = multi_scale_deformable_attention(value.float(), shapes, locations.float(), weights.float())
    assert (ours32.double() - expected).abs().max() < 1e-5


def test_module_anchor_grouping_and_shapes():
    torch.manual_seed(0)
    attention = MultiScaleDeformableAttention(embed_dims=16, num_heads=2, num_levels=2, num_points=8).double()
    shapes = [(4, 6), (2, 3)]
    query = torch.randn(3, 5, 16, dtype=torch.float64)
    value = torch.randn(3, 30, 16, dtype=torch.float64)
    refs = torch.rand(3, 5, 4, 2, dtype=torch.float64)  # 4 anchors -> 2 points around each
    locations, weights = attention.sampling(query, refs, shapes)
    assert locations.shape == (3, 5, 1, 2, 2, 8, 2)
    assert torch.allclose(weights.sum((-1, -2)), torch.ones(3, 5, 1, 2, dtype=torch.float64))
    # with zero offsets every point sits on its anchor: point p on anchor p % 4
    torch.nn.init.zeros_(attention.sampling_offsets.bias)
    locations, _ = attention.sampling(query, refs, shapes)
    for p in range(8):
        assert torch.allclose(locations[:, :, 0, 0, 0, p], refs[:, :, p % 4])
    assert attention(query, value, refs, shapes).shape == (3, 5, 16)


def test_bad_inputs_are_named():
    value = torch.randn(1, 10, 2, 4)
    locations = torch.rand(1, 3, 2, 1, 4, 2)
    weights = torch.rand(1, 3, 2, 1, 4)
    with pytest.raises(ValueError, match="spatial_shapes"):
        multi_scale_deformable_attention(value, [(3, 3)], locations, weights)
    with pytest.raises(ValueError, match="num_heads"):
        MultiScaleDeformableAttention(embed_dims=10, num_heads=3)
    attention = MultiScaleDeformableAttention(embed_dims=8, num_heads=2, num_levels=1, num_points=4)
    with pytest.raises(ValueError, match="multiple"):
        attention(torch.randn(1, 3, 8), torch.randn(1, 9, 8), torch.rand(1, 3, 3, 2), [(3, 3)])
