"""``PerceptualLoss``: LPIPS (Zhang et al. 2018), the perceptual term of the LDM autoencoder loss.

The network is LPIPS v0.1's: VGG-16 features at five depths (relu1_2 ... relu5_3), each channel-unit
normalised, their squared difference weighted by a learned 1x1 convolution, averaged over space and
summed over depths. Its weights are not downloaded: they come from one local file holding this
module's ``state_dict`` (VGG and linear layers together; ``convert_lpips_weights`` builds one from
torchvision's VGG-16 file plus the ``lpips`` package's ``vgg.pth``). Asking for the loss without a
file is an error, because random VGG features are not a perceptual metric and would silently train
the autoencoder towards nothing in particular.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["PerceptualLoss", "convert_lpips_weights"]

# VGG-16 "features" indices after which LPIPS taps (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
_TAPS = (3, 8, 15, 22, 29)
_CHANNELS = (64, 128, 256, 512, 512)
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


class _LPIPSNetwork(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import vgg16

        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))
        self.features = vgg16(weights=None).features[: _TAPS[-1] + 1]
        self.linear = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in _CHANNELS)


class PerceptualLoss(nn.Module):
    """LPIPS distance per sample between images in [-1, 1]; frozen, always in eval mode."""

    def __init__(self, weights_path: str | Path | None) -> None:
        super().__init__()
        if weights_path is None:
            raise ValueError(
                "perceptual_weight > 0 needs perceptual_weights_path: a local file with LPIPS weights "
                "(see zoo.diffusion.perceptual.convert_lpips_weights); nothing is downloaded"
            )
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"perceptual_weights_path {str(path)!r} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        with torch.device("meta"):  # no random initialisation of 15M VGG weights about to be replaced
            self.net = _LPIPSNetwork()
        try:
            self.net.load_state_dict(state, assign=True)
        except RuntimeError as error:
            raise ValueError(f"{str(path)!r} does not hold PerceptualLoss weights: {error}") from error
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def architecture() -> nn.Module:
        """The network whose ``state_dict`` a weights file holds."""
        return _LPIPSNetwork()

    def train(self, mode: bool = True) -> PerceptualLoss:
        return super().train(False)

    @staticmethod
    def _unit(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
        return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)

    def forward(self, images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = (images - net.shift) / net.scale
        y = (reference - net.shift) / net.scale
        distance = images.new_zeros(images.shape[0])
        tap = 0
        for index, layer in enumerate(net.features):
            x, y = layer(x), layer(y)
            if index == _TAPS[tap]:
                diff = (self._unit(x) - self._unit(y)).pow(2)
                distance = distance + net.linear[tap](diff).mean(dim=(1, 2, 3))
                tap += 1
        return distance


def convert_lpips_weights(
    vgg16_path: str | Path, lpips_linear_path: str | Path, out_path: str | Path
) -> None:
    """Combine torchvision's ``vgg16-*.pth`` and the ``lpips`` package's ``weights/v0.1/vgg.pth`` into one file."""
    vgg = torch.load(vgg16_path, map_location="cpu", weights_only=True)
    linear = torch.load(lpips_linear_path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in vgg.items() if k.startswith("features.") and int(k.split(".")[1]) <= _TAPS[-1]}
    for i in range(len(_CHANNELS)):
        state[f"linear.{i}.weight"] = linear[f"lin{i}.model.1.weight"]
    state["shift"] = torch.tensor(_SHIFT).view(1, 3, 1, 1)
    state["scale"] = torch.tensor(_SCALE).view(1, 3, 1, 1)
    torch.save(state, Path(out_path))
