"""Building blocks shared by more than one family."""

from zoo.layers.conv_stem import ConvStemPatchEmbed

__all__ = ["ConvStemPatchEmbed"]
