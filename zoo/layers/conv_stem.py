"""A convolutional stem for ViTs (Xiao et al., 2021, "Early Convolutions Help Transformers See Better").

Replaces the single strided "patchify" convolution with a few 3x3 stride-2 convolutions. The
token grid and width are unchanged, so it drops into timm's ``VisionTransformer`` as its
``embed_layer``; ViTs then train faster and more stably, most of all on small data and small
images, for about the cost of one transformer block.
"""

from __future__ import annotations

import math

from timm.layers import PatchEmbed
from torch import nn

__all__ = ["ConvStemPatchEmbed"]


class ConvStemPatchEmbed(PatchEmbed):
    """timm ``PatchEmbed`` projecting with ``log2(patch)`` 3x3/stride-2 conv-BN-ReLU layers and a 1x1 conv."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        patch = self.patch_size[0]
        if self.patch_size[0] != self.patch_size[1] or patch < 2 or patch & (patch - 1):
            raise ValueError(
                f"a convolutional stem needs a square power-of-two patch size, got {self.patch_size}"
            )
        in_chans, embed_dim = self.proj.in_channels, self.proj.out_channels
        stages = int(math.log2(patch))
        widths = [embed_dim // 2 ** (stages - i) for i in range(1, stages + 1)]
        layers, channels = [], in_chans
        for width in widths:
            layers += [
                nn.Conv2d(channels, width, 3, 2, 1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            channels = width
        layers.append(nn.Conv2d(channels, embed_dim, 1))
        self.proj = nn.Sequential(*layers)
