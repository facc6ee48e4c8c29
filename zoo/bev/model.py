"""BEVFormer (Li et al., 2022) as a plain ``nn.Module``, without mmcv/mmdet3d.

Camera images -> timm backbone + FPN (``zoo.bev.backbone``) -> BEV encoder with temporal self-attention and
spatial cross-attention (``zoo.bev.encoder``) -> DETR decoder with box refinement (``zoo.bev.decoder``) ->
head (``zoo.bev.head``). ``BEVFORMER_CONFIGS`` holds the published tiny/small/base shapes (their backbones
without deformable convolutions) and the CPU-sized default that trains here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from zoo.bev.backbone import CameraEncoder
from zoo.bev.decoder import DetectionDecoder
from zoo.bev.encoder import BEVEncoder
from zoo.bev.head import DetectionHead

__all__ = ["BEVFORMER_CONFIGS", "NUSCENES_CLASSES", "BEVFormer", "BEVFormerConfig"]

NUSCENES_CLASSES = (
    "car", "truck", "construction_vehicle", "bus", "trailer",
    "barrier", "motorcycle", "bicycle", "pedestrian", "traffic_cone",
)  # fmt: skip


@dataclass
class BEVFormerConfig:
    backbone: str = "resnet50"
    out_indices: tuple[int, ...] = (4,)
    embed_dims: int = 256
    num_heads: int = 8
    ffn_dims: int = 512
    num_levels: int = 1
    bev_h: int = 50
    bev_w: int = 50
    encoder_layers: int = 3
    decoder_layers: int = 6
    num_points_in_pillar: int = 4
    sca_points: int = 8
    tsa_points: int = 4
    decoder_points: int = 4
    num_query: int = 900
    num_classes: int = 10
    num_cameras: int = 6
    point_cloud_range: tuple[float, ...] = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)
    can_bus_dims: int = 18
    cross_attention: str = "deformable"
    dropout: float = 0.1
    level_embeds: int = 4  # BEVFormer always allocates 4 level embeddings, whatever num_levels

    def __post_init__(self) -> None:
        if self.num_levels < len(self.out_indices):
            raise ValueError(f"num_levels {self.num_levels} < {len(self.out_indices)} backbone stages")
        if len(self.point_cloud_range) != 6:
            raise ValueError(f"point_cloud_range needs 6 values, got {self.point_cloud_range}")
        if self.sca_points % self.num_points_in_pillar:
            raise ValueError(f"sca_points {self.sca_points} must be a multiple of num_points_in_pillar")


BEVFORMER_CONFIGS: dict[str, BEVFormerConfig] = {
    # published shapes (projects/configs/bevformer/*.py); backbones without DCN
    "bevformer_tiny": BEVFormerConfig(),
    "bevformer_small": BEVFormerConfig(backbone="resnet101", bev_h=150, bev_w=150),
    "bevformer_base": BEVFormerConfig(
        backbone="resnet101", out_indices=(2, 3, 4), num_levels=4, bev_h=200, bev_w=200, encoder_layers=6
    ),
    # trains on the synthetic scenes on a CPU in minutes
    "bevformer_cpu": BEVFormerConfig(
        backbone="resnet18",
        out_indices=(1, 2),
        embed_dims=64,
        num_heads=4,
        ffn_dims=128,
        num_levels=2,
        bev_h=32,
        bev_w=32,
        encoder_layers=2,
        decoder_layers=3,
        num_query=150,
        num_classes=5,
        point_cloud_range=(-25.6, -25.6, -1.0, 25.6, 25.6, 4.0),
        dropout=0.0,
    ),
}


class BEVFormer(nn.Module):
    """Multi-camera 3D detector; ``forward`` returns per-decoder-layer class logits and box codes."""

    def __init__(self, config: BEVFormerConfig | None = None, **overrides) -> None:
        super().__init__()
        config = replace(config or BEVFormerConfig(), **overrides)
        self.config = config
        c = config
        self.camera_encoder = CameraEncoder(c.backbone, tuple(c.out_indices), c.embed_dims, c.num_levels)
        self.bev_embedding = nn.Embedding(c.bev_h * c.bev_w, c.embed_dims)
        self.row_embed = nn.Embedding(c.bev_h, c.embed_dims // 2)
        self.col_embed = nn.Embedding(c.bev_w, c.embed_dims // 2)
        self.level_embeds = nn.Parameter(torch.empty(max(c.level_embeds, c.num_levels), c.embed_dims))
        self.cams_embeds = nn.Parameter(torch.empty(c.num_cameras, c.embed_dims))
        self.can_bus_mlp = nn.Sequential(
            nn.Linear(c.can_bus_dims, c.embed_dims // 2), nn.ReLU(inplace=True),
            nn.Linear(c.embed_dims // 2, c.embed_dims), nn.ReLU(inplace=True), nn.LayerNorm(c.embed_dims),
        )  # fmt: skip
        self.encoder = BEVEncoder(
            c.encoder_layers, c.bev_h, c.bev_w, c.point_cloud_range, c.num_points_in_pillar,
            embed_dims=c.embed_dims, num_heads=c.num_heads, ffn_dims=c.ffn_dims, num_levels=c.num_levels,
            sca_points=c.sca_points, tsa_points=c.tsa_points, cross_attention=c.cross_attention, dropout=c.dropout,
        )  # fmt: skip
        self.query_embedding = nn.Embedding(c.num_query, 2 * c.embed_dims)
        self.reference_points = nn.Linear(c.embed_dims, 3)
        self.decoder = DetectionDecoder(
            c.decoder_layers, embed_dims=c.embed_dims, num_heads=c.num_heads, ffn_dims=c.ffn_dims,
            num_points=c.decoder_points, dropout=c.dropout,
        )  # fmt: skip
        self.head = DetectionHead(c.embed_dims, c.num_classes, c.decoder_layers, c.point_cloud_range)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.level_embeds.is_meta:
            return
        nn.init.normal_(self.level_embeds)
        nn.init.normal_(self.cams_embeds)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)
        nn.init.xavier_uniform_(self.reference_points.weight)
        nn.init.zeros_(self.reference_points.bias)

    def to_dict(self) -> dict:
        return asdict(self.config)

    # ------------------------------------------------------------------ parts
    def image_features(self, images: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """(B, N, 3, H, W) -> ((B, N, S, C) flattened levels with camera/level embeddings, level shapes)."""
        if images.shape[1] != self.config.num_cameras:
            raise ValueError(
                f"images have {images.shape[1]} cameras, the model was built for {self.config.num_cameras}"
            )
        levels = self.camera_encoder(images)
        flat, shapes = [], []
        for index, level in enumerate(levels):
            shapes.append((level.shape[-2], level.shape[-1]))
            tokens = level.flatten(3).transpose(2, 3)  # (B, N, h*w, C)
            flat.append(tokens + self.cams_embeds[None, :, None] + self.level_embeds[index])
        return torch.cat(flat, 2), shapes

    def bev_features(
        self, images: torch.Tensor, lidar2img: torch.Tensor, can_bus: torch.Tensor,
        prev_bev: torch.Tensor | None = None, prev_exists: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """One frame: images (B, N, 3, H, W), lidar2img (B, N, 4, 4), can_bus (B, 18) -> BEV (B, H*W, C)."""
        if lidar2img.shape[:2] != images.shape[:2] or lidar2img.shape[-2:] != (4, 4):
            raise ValueError(
                f"lidar2img must be (B, cameras, 4, 4) = {(*images.shape[:2], 4, 4)}, got {tuple(lidar2img.shape)}"
            )
        if can_bus.shape != (images.shape[0], self.config.can_bus_dims):
            raise ValueError(f"can_bus must be (B, {self.config.can_bus_dims}), got {tuple(can_bus.shape)}")
        features, shapes = self.image_features(images)
        batch = images.shape[0]
        c = self.config
        bev_query = self.bev_embedding.weight[None].expand(batch, -1, -1)
        bev_query = bev_query + self.can_bus_mlp(can_bus.to(bev_query.dtype))[:, None]
        bev_pos = (
            torch.cat(
                [
                    self.col_embed.weight[None, :, :].expand(c.bev_h, -1, -1),
                    self.row_embed.weight[:, None, :].expand(-1, c.bev_w, -1),
                ],
                -1,
            )
            .flatten(0, 1)[None]
            .expand(batch, -1, -1)
        )
        return self.encoder(
            bev_query,
            bev_pos,
            features,
            shapes,
            lidar2img,
            tuple(images.shape[-2:]),
            can_bus,
            prev_bev,
            prev_exists,
        )

    def detect(self, bev: torch.Tensor, return_queries: bool = False) -> tuple:
        """BEV (B, H*W, C) -> per decoder layer: logits (B, Q, classes), codes (B, Q, 10); and, with
        ``return_queries``, the last layer's queries (B, Q, C), which a planner attends to as agents."""
        batch = bev.shape[0]
        query_pos, query = self.query_embedding.weight.split(self.config.embed_dims, dim=-1)
        query_pos, query = query_pos[None].expand(batch, -1, -1), query[None].expand(batch, -1, -1)
        # The anchors in the parameters' precision, not autocast's: a bf16 sigmoid places a centre to within
        # 1/256 of the BEV range (0.4 m over 102.4 m), and the decoder refines from there.
        with torch.autocast(query_pos.device.type, enabled=False):
            reference = self.reference_points(query_pos).sigmoid()
        outputs, references = self.decoder(
            query, query_pos, bev, (self.config.bev_h, self.config.bev_w), reference, self.head.reg_branches
        )
        logits, codes = self.head(outputs, references)
        return (logits, codes, outputs[-1]) if return_queries else (logits, codes)

    # ---------------------------------------------------------------- forward
    def history_bev(
        self, images: torch.Tensor, lidar2img: torch.Tensor, can_bus: torch.Tensor, prev_exists: torch.Tensor
    ) -> torch.Tensor | None:
        """BEV of the queue's earlier frames, frame by frame, without gradients and in eval mode (as BEVFormer)."""
        if images.shape[1] == 0:
            return None
        was_training = self.training
        self.eval()
        prev = None
        with torch.no_grad():
            for t in range(images.shape[1]):
                prev = self.bev_features(
                    images[:, t],
                    lidar2img[:, t],
                    can_bus[:, t],
                    prev,
                    prev_exists[:, t] if prev is not None else None,
                )
        self.train(was_training)
        return prev

    def forward(
        self,
        images: torch.Tensor,
        lidar2img: torch.Tensor,
        can_bus: torch.Tensor,
        prev_exists: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``images`` (B, T, N, 3, H, W): a queue of T frames, the last one detected; ``lidar2img`` (B, T, N, 4, 4);
        ``can_bus`` (B, T, 18); ``prev_exists`` (B, T) bool, whether frame t continues frame t-1."""
        return self.detect(self.encode(images, lidar2img, can_bus, prev_exists))

    def encode(
        self,
        images: torch.Tensor,
        lidar2img: torch.Tensor,
        can_bus: torch.Tensor,
        prev_exists: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The last frame's BEV (B, H*W, C) from a queue, as ``forward`` takes it."""
        if images.dim() != 6:
            raise ValueError(f"images must be (B, T, cameras, 3, H, W), got {tuple(images.shape)}")
        batch, frames = images.shape[:2]
        if prev_exists is None:
            prev_exists = torch.ones(batch, frames, dtype=torch.bool, device=images.device)
            prev_exists[:, 0] = False
        prev = self.history_bev(images[:, :-1], lidar2img[:, :-1], can_bus[:, :-1], prev_exists)
        return self.bev_features(
            images[:, -1],
            lidar2img[:, -1],
            can_bus[:, -1],
            prev,
            prev_exists[:, -1] if prev is not None else None,
        )
