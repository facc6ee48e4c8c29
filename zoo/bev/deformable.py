"""Multi-scale deformable attention (Deformable DETR) in pure PyTorch, batched with ``grid_sample``.

Written by hand because the field's implementations need compiled extensions (mmcv's CUDA op, the
Deformable-DETR kernel) that do not install on current PyTorch; this one runs anywhere, on CPU and GPU,
and its semantics equal those kernels: sampling locations are normalised (x, y) in [0, 1] with (0, 0) the
top-left corner of the map, pixel centres at ``(i + 0.5) / size``, bilinear interpolation, zero outside.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MultiScaleDeformableAttention", "multi_scale_deformable_attention"]


def multi_scale_deformable_attention(
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Weighted sum of bilinear samples.

    Args:
        value: (B, S, heads, head_dim), the levels' maps flattened row-major and concatenated.
        spatial_shapes: (H, W) per level, ``sum(H * W) == S``.
        sampling_locations: (B, Q, heads, levels, points, 2) normalised (x, y).
        attention_weights: (B, Q, heads, levels, points).

    Returns:
        (B, Q, heads * head_dim).
    """
    batch, total, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    if sum(h * w for h, w in spatial_shapes) != total:
        raise ValueError(f"spatial_shapes {list(spatial_shapes)} cover {sum(h * w for h, w in spatial_shapes)} "
                         f"positions but value has {total}")  # fmt: skip
    if levels != len(spatial_shapes):
        raise ValueError(
            f"sampling_locations has {levels} levels but spatial_shapes has {len(spatial_shapes)}"
        )
    grids = 2 * sampling_locations - 1
    samples = []
    for level, value_l in enumerate(value.split([h * w for h, w in spatial_shapes], dim=1)):
        h, w = spatial_shapes[level]
        value_l = value_l.permute(0, 2, 3, 1).reshape(batch * heads, head_dim, h, w)
        grid_l = grids[:, :, :, level].transpose(1, 2).reshape(batch * heads, queries, points, 2)
        samples.append(
            F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    stacked = torch.stack(samples, dim=-2).flatten(-2)  # (B*heads, head_dim, Q, levels*points)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    out = (stacked * weights).sum(-1).view(batch, heads * head_dim, queries)
    return out.transpose(1, 2).contiguous()


class MultiScaleDeformableAttention(nn.Module):
    """Each query attends to ``points`` learned offsets around its reference point(s) on every level.

    ``reference_points`` is (B, Q, R, 2): ``R`` anchors per query (1 for ordinary deformable attention;
    BEVFormer's spatial cross-attention passes the pillar's 4 projected heights). The ``points`` of each
    head and level are split evenly over the anchors, ``points / R`` offsets around each, as BEVFormer's
    ``MSDeformableAttention3D`` does. ``query_dim`` lets the offsets/weights come from a wider query
    (temporal self-attention concatenates the previous and current BEV).

    Args:
        embed_dims: value/query width.
        num_heads: attention heads.
        num_levels: feature levels of ``value``.
        num_points: sampling points per head and level.
        num_groups: independent value sets sampled per query (2 for temporal self-attention: history,
            current), each with its own offsets and softmax; outputs are averaged.
        output_proj: whether to end with a linear layer (spatial cross-attention has its own outside).
    """

    def __init__(
        self,
        embed_dims: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        num_groups: int = 1,
        query_dim: int | None = None,
        output_proj: bool = True,
    ) -> None:
        super().__init__()
        if embed_dims % num_heads:
            raise ValueError(f"embed_dims {embed_dims} must be divisible by num_heads {num_heads}")
        self.embed_dims, self.num_heads, self.num_levels = embed_dims, num_heads, num_levels
        self.num_points, self.num_groups = num_points, num_groups
        query_dim = query_dim or embed_dims
        self.sampling_offsets = nn.Linear(query_dim, num_groups * num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(query_dim, num_groups * num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.output_proj = nn.Linear(embed_dims, embed_dims) if output_proj else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's init: offsets fan out from the reference in one direction per head."""
        nn.init.zeros_(self.sampling_offsets.weight)
        if self.sampling_offsets.weight.is_meta:
            return
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2 * math.pi / self.num_heads)
        grid = torch.stack([angles.cos(), angles.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True).values
        grid = grid.view(1, self.num_heads, 1, 1, 2).repeat(
            self.num_groups, 1, self.num_levels, self.num_points, 1
        )
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for layer in (self.value_proj, self.output_proj):
            if layer is not None:
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)

    def sampling(
        self, query: torch.Tensor, reference_points: torch.Tensor, spatial_shapes: Sequence[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Locations (B, Q, G, heads, levels, points, 2) and softmaxed weights (B, Q, G, heads, levels, points)."""
        batch, queries, _ = query.shape
        groups, heads, levels, points = self.num_groups, self.num_heads, self.num_levels, self.num_points
        anchors = reference_points.shape[-2]
        if points % anchors:
            raise ValueError(f"num_points {points} must be a multiple of the {anchors} reference anchors")
        offsets = self.sampling_offsets(query).view(batch, queries, groups, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, queries, groups, heads, levels * points)
        weights = weights.softmax(-1).view(batch, queries, groups, heads, levels, points)
        normaliser = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=query.dtype, device=query.device)
        offsets = offsets / normaliser[:, None, :]
        # points are laid out (points / anchors, anchors): point p uses anchor p % anchors.
        offsets = offsets.view(batch, queries, groups, heads, levels, points // anchors, anchors, 2)
        if reference_points.dim() == 4:  # (B, Q, R, 2): the same anchors for every group
            reference_points = reference_points[:, :, None]
        ref = reference_points[:, :, :, None, None, None, :, :]  # (B, Q, G|1, 1, 1, 1, R, 2)
        locations = (ref + offsets).view(batch, queries, groups, heads, levels, points, 2)
        return locations, weights

    def forward(
        self,
        query: torch.Tensor,
        value: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
    ) -> torch.Tensor:
        """``query`` (B, Q, query_dim); ``value`` (B, G, S, C) or (B, S, C); ``reference_points`` (B, Q, R, 2)
        or (B, Q, G, R, 2). Returns (B, Q, C), the mean over groups."""
        if value.dim() == 3:
            value = value[:, None]
        batch, groups, total, channels = value.shape
        if groups != self.num_groups:
            raise ValueError(f"value has {groups} groups, this attention was built for {self.num_groups}")
        locations, weights = self.sampling(query, reference_points, spatial_shapes)
        value = self.value_proj(value).view(batch * groups, total, self.num_heads, channels // self.num_heads)
        queries = query.shape[1]
        locations = locations.transpose(1, 2).reshape(batch * groups, queries, *locations.shape[3:])
        weights = weights.transpose(1, 2).reshape(batch * groups, queries, *weights.shape[3:])
        out = multi_scale_deformable_attention(value, spatial_shapes, locations, weights)
        out = out.view(batch, groups, queries, channels).mean(1)
        return self.output_proj(out) if self.output_proj is not None else out
