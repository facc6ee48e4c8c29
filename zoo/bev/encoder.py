"""BEVFormer's encoder: temporal self-attention, spatial cross-attention, and the layer stack around them.

Each layer (post-norm, as published): temporal self-attention over ``[previous BEV, current BEV]`` -> norm
-> spatial cross-attention into the cameras -> norm -> FFN -> norm. The bookkeeping is per sample
throughout, which fixes the reference's batch problems: camera visibility comes from each sample's own
``lidar2img`` (not the first sample's), and the temporal values of sample b are sample b's own previous
and current BEV (not ``value[:batch]`` of an interleaved stack).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from zoo.bev.deformable import MultiScaleDeformableAttention
from zoo.bev.geometry import align_previous_bev, project_to_cameras, reference_points_2d, reference_points_3d

__all__ = [
    "BEVEncoder",
    "BEVEncoderLayer",
    "DenseCrossAttention",
    "FeedForward",
    "SpatialCrossAttention",
    "TemporalSelfAttention",
]


class FeedForward(nn.Module):
    """Linear-ReLU-Dropout-Linear-Dropout with the identity added (mmcv's FFN)."""

    def __init__(self, embed_dims: int, ffn_dims: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dims, ffn_dims), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(ffn_dims, embed_dims), nn.Dropout(dropout),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x)


class SpatialCrossAttention(nn.Module):
    """Every BEV query samples the image features of the cameras its pillar projects into.

    For each sample and camera, the queries with at least one visible height are gathered (padded to the
    largest count over the batch and cameras), attend with deformable attention around their projected
    anchors, and the results are summed back and divided by the number of cameras that saw each query.
    """

    def __init__(
        self, embed_dims: int, num_heads: int, num_levels: int, num_points: int, dropout: float = 0.1
    ):
        super().__init__()
        self.attention = MultiScaleDeformableAttention(
            embed_dims, num_heads, num_levels, num_points, output_proj=False
        )
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        self.dropout = nn.Dropout(dropout)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        features: torch.Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        reference_cam: torch.Tensor,
        visible: torch.Tensor,
    ) -> torch.Tensor:
        """``query`` (B, Q, C); ``features`` (B, N, S, C); ``reference_cam`` (B, N, Q, Z, 2); ``visible``
        (B, N, Q, Z). Returns (B, Q, C) with the residual added."""
        batch, queries, channels = query.shape
        cams = features.shape[1]
        hit = visible.any(-1)  # (B, N, Q)
        counts = hit.sum(-1)  # (B, N)
        # a data-dependent size: torch.export keeps it symbolic (bounded by the checks), so exported graphs
        # gather as few queries as eager mode does
        longest = counts.max().clamp(min=1).item()
        torch._check(longest >= 1)
        torch._check(longest <= queries)
        # visible queries first, in their original order: the smallest of distinct keys (a stable sort of
        # "not visible", written as top-k, which ONNX has, unlike a stable sort)
        keys = torch.arange(queries, device=query.device) + queries * (~hit)
        order = keys.topk(longest, dim=-1, largest=False).indices  # (B, N, L)
        valid = torch.arange(longest, device=query.device) < counts[..., None]  # (B, N, L)
        gathered = torch.gather(
            query[:, None].expand(-1, cams, -1, -1), 2, order[..., None].expand(-1, -1, -1, channels)
        )
        anchors = reference_cam.shape[-2]
        refs = torch.gather(reference_cam, 2, order[..., None, None].expand(-1, -1, -1, anchors, 2))
        out = self.attention(
            gathered.flatten(0, 1), features.flatten(0, 1), refs.flatten(0, 1), spatial_shapes
        ).view(batch, cams, longest, channels)
        out = out * valid[..., None]
        slots = torch.zeros_like(query).scatter_add_(
            1, order.flatten(1, 2)[..., None].expand(-1, -1, channels), out.flatten(1, 2)
        )
        slots = slots / hit.sum(1).clamp(min=1)[..., None].to(slots.dtype)
        return query + self.dropout(self.output_proj(slots))


class DenseCrossAttention(nn.Module):
    """Global multi-head attention from every BEV query to every image token of every camera.

    The dense baseline that deformable attention replaces (used by ``benchmarks/bev_scaling.py``); the
    queries see no geometry beyond the camera and level embeddings added to the keys.
    """

    def __init__(self, embed_dims: int, num_heads: int, dropout: float = 0.1, **_: object) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(embed_dims, num_heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)

    def forward(self, query, features, spatial_shapes, reference_cam, visible) -> torch.Tensor:
        keys = features.flatten(1, 2)
        return query + self.dropout(self.attention(query, keys, keys, need_weights=False)[0])


class TemporalSelfAttention(nn.Module):
    """Deformable attention over the aligned previous BEV and the current BEV queries, averaged.

    Offsets and weights come from ``[previous BEV ; query + pos]`` (2C); the history group samples the
    previous BEV at the ego-motion-shifted reference points, the current group the current queries at the
    unshifted ones. Where a sample has no previous frame, its own current queries stand in for the
    history, which makes the layer plain deformable self-attention, as the reference does.
    """

    def __init__(self, embed_dims: int, num_heads: int, num_points: int, dropout: float = 0.1):
        super().__init__()
        self.attention = MultiScaleDeformableAttention(
            embed_dims, num_heads, num_levels=1, num_points=num_points, num_groups=2, query_dim=2 * embed_dims
        )
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        query: torch.Tensor,
        query_pos: torch.Tensor,
        prev_bev: torch.Tensor,
        prev_exists: torch.Tensor,
        reference_2d: torch.Tensor,
        shift: torch.Tensor,
        bev_shape: tuple[int, int],
    ) -> torch.Tensor:
        """``query``, ``prev_bev`` (B, Q, C); ``prev_exists`` (B,) bool; ``reference_2d`` (Q, 2); ``shift``
        (B, 2) normalised (zero where there is no previous frame)."""
        batch = query.shape[0]
        prev_bev = torch.where(prev_exists[:, None, None], prev_bev, query)
        current = reference_2d[None].expand(batch, -1, -1)
        history = current + shift[:, None, :]  # a new tensor: the current references are left as they are
        refs = torch.stack([history, current], dim=2)[:, :, :, None, :]  # (B, Q, 2 groups, 1 anchor, 2)
        values = torch.stack([prev_bev, query], dim=1)  # (B, 2, Q, C)
        mixed = torch.cat([prev_bev, query + query_pos], -1)
        out = self.attention(mixed, values, refs, [bev_shape])
        return query + self.dropout(out)


class BEVEncoderLayer(nn.Module):
    def __init__(
        self,
        embed_dims: int,
        num_heads: int,
        ffn_dims: int,
        num_levels: int,
        sca_points: int,
        tsa_points: int,
        cross_attention: str = "deformable",
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.temporal = TemporalSelfAttention(embed_dims, num_heads, tsa_points, dropout)
        if cross_attention == "deformable":
            self.spatial = SpatialCrossAttention(embed_dims, num_heads, num_levels, sca_points, dropout)
        elif cross_attention == "dense":
            self.spatial = DenseCrossAttention(embed_dims, num_heads, dropout)
        else:
            raise ValueError(f"cross_attention must be 'deformable' or 'dense', got {cross_attention!r}")
        self.ffn = FeedForward(embed_dims, ffn_dims, dropout)
        self.norms = nn.ModuleList(nn.LayerNorm(embed_dims) for _ in range(3))

    def forward(self, query, query_pos, prev_bev, prev_exists, reference_2d, shift, bev_shape, features,
                spatial_shapes, reference_cam, visible) -> torch.Tensor:  # fmt: skip
        query = self.norms[0](
            self.temporal(query, query_pos, prev_bev, prev_exists, reference_2d, shift, bev_shape)
        )
        query = self.norms[1](self.spatial(query, features, spatial_shapes, reference_cam, visible))
        return self.norms[2](self.ffn(query))


class BEVEncoder(nn.Module):
    """BEV queries + camera features (+ previous BEV) -> BEV features (B, H*W, C)."""

    def __init__(
        self,
        num_layers: int,
        bev_h: int,
        bev_w: int,
        point_cloud_range: Sequence[float],
        num_points_in_pillar: int,
        **layer_kwargs,
    ) -> None:
        super().__init__()
        self.bev_h, self.bev_w = bev_h, bev_w
        self.point_cloud_range = tuple(float(v) for v in point_cloud_range)
        self.num_points_in_pillar = num_points_in_pillar
        self.layers = nn.ModuleList(BEVEncoderLayer(**layer_kwargs) for _ in range(num_layers))

    def forward(
        self,
        bev_query: torch.Tensor,
        bev_pos: torch.Tensor,
        features: torch.Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        lidar2img: torch.Tensor,
        img_size: tuple[int, int],
        can_bus: torch.Tensor,
        prev_bev: torch.Tensor | None,
        prev_exists: torch.Tensor | None,
    ) -> torch.Tensor:
        """``bev_query``/``bev_pos`` (B, Q, C); ``features`` (B, N, S, C); ``prev_bev`` (B, Q, C) or None;
        ``prev_exists`` (B,) bool: which samples continue from ``prev_bev``."""
        device, dtype = bev_query.device, bev_query.dtype
        ref_2d = reference_points_2d(self.bev_h, self.bev_w, device, dtype)
        ref_3d = reference_points_3d(self.bev_h, self.bev_w, self.num_points_in_pillar, device)
        ref_cam, visible = project_to_cameras(ref_3d, self.point_cloud_range, lidar2img, img_size)
        ref_cam = ref_cam.to(dtype)
        batch = bev_query.shape[0]
        if prev_bev is None:
            prev_exists = torch.zeros(batch, dtype=torch.bool, device=device)
            prev_bev = bev_query
            shift = torch.zeros(batch, 2, device=device, dtype=dtype)
        else:
            if prev_exists is None:
                prev_exists = torch.ones(batch, dtype=torch.bool, device=device)
            aligned, shift = align_previous_bev(
                prev_bev, can_bus, self.bev_h, self.bev_w, self.point_cloud_range
            )
            prev_bev = aligned
            shift = shift * prev_exists[:, None].to(shift.dtype)
        query = bev_query
        for layer in self.layers:
            query = layer(query, bev_pos, prev_bev, prev_exists, ref_2d, shift, (self.bev_h, self.bev_w), features,
                          spatial_shapes, ref_cam, visible)  # fmt: skip
        return query
