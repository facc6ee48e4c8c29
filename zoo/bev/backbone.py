"""Image features for every camera: a timm backbone (``features_only``) and an FPN neck.

timm supplies the backbone (any of its CNNs or hierarchical transformers; the published BEVFormer uses
ResNet-50 / ResNet-101, here without deformable convolutions, which need compiled ops). The neck is
mmdet's FPN as BEVFormer configures it: 1x1 lateral convolutions, a top-down pathway with nearest
upsampling, 3x3 output convolutions, and extra levels made by stride-2 3x3 convolutions on the last output.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FPN", "CameraEncoder"]


class FPN(nn.Module):
    """Feature pyramid: ``len(in_channels)`` inputs -> ``num_outs`` maps of ``out_channels``."""

    def __init__(self, in_channels: list[int], out_channels: int, num_outs: int) -> None:
        super().__init__()
        if num_outs < len(in_channels):
            raise ValueError(f"num_outs {num_outs} must be >= the {len(in_channels)} input levels")
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels
        )
        self.extra_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
            for _ in range(num_outs - len(in_channels))
        )
        for conv in self.modules():
            if isinstance(conv, nn.Conv2d):
                nn.init.xavier_uniform_(conv.weight)
                nn.init.zeros_(conv.bias)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)]
        for conv in self.extra_convs:
            outs.append(conv(outs[-1]))
        return outs


class CameraEncoder(nn.Module):
    """(B, N, 3, H, W) camera images -> list over levels of (B, N, C, h, w) features.

    Args:
        backbone: timm model name; weights are random (nothing is downloaded).
        out_indices: the backbone stages used (timm's ``features_only`` indices).
        embed_dims: FPN width.
        num_levels: FPN outputs (extra ones are strided convolutions).
    """

    def __init__(self, backbone: str, out_indices: tuple[int, ...], embed_dims: int, num_levels: int) -> None:
        super().__init__()
        self.backbone = timm.create_model(
            backbone, pretrained=False, features_only=True, out_indices=out_indices
        )
        self.neck = FPN(list(self.backbone.feature_info.channels()), embed_dims, num_levels)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if images.dim() != 5 or images.shape[2] != 3:
            raise ValueError(f"images must be (B, cameras, 3, H, W), got {tuple(images.shape)}")
        batch, cams = images.shape[:2]
        features = self.neck(self.backbone(images.flatten(0, 1)))
        return [f.view(batch, cams, *f.shape[1:]) for f in features]
