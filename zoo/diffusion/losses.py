"""The adversarial parts of the LDM autoencoder loss, written here because diffusers has no training losses.

- ``PatchDiscriminator``: pix2pix's PatchGAN ("NLayerDiscriminator" in taming-transformers), one logit
  per overlapping patch; BatchNorm by default, or spectral normalisation on every convolution instead.
- ``hinge_discriminator_loss`` / ``hinge_generator_loss``: the hinge GAN losses LDM trains with.
- ``adaptive_generator_weight``: LDM's balance between reconstruction and GAN loss, the ratio of their
  gradient norms at the decoder's last layer, so neither drowns the other as their scales drift.
- ``gradient_penalty``: R1 (Mescheder et al. 2018), a penalty on the discriminator's gradient at real
  images; an alternative to spectral norm for keeping the discriminator smooth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PatchDiscriminator",
    "adaptive_generator_weight",
    "gradient_penalty",
    "hinge_discriminator_loss",
    "hinge_generator_loss",
]


class PatchDiscriminator(nn.Module):
    """PatchGAN: ``num_layers`` stride-2 convolutions, then two stride-1 ones; outputs a logit map.

    Args:
        spectral_norm: wrap every convolution in ``torch.nn.utils.parametrizations.spectral_norm`` and
            drop BatchNorm (the two don't mix: BatchNorm would undo the Lipschitz bound).
    """

    def __init__(
        self, in_channels: int = 3, channels: int = 64, num_layers: int = 3, spectral_norm: bool = False
    ) -> None:
        super().__init__()

        def conv(c_in: int, c_out: int, stride: int, bias: bool) -> nn.Module:
            layer = nn.Conv2d(
                c_in, c_out, kernel_size=4, stride=stride, padding=1, bias=bias or spectral_norm
            )
            return nn.utils.parametrizations.spectral_norm(layer) if spectral_norm else layer

        def norm(c: int) -> nn.Module:
            return nn.Identity() if spectral_norm else nn.BatchNorm2d(c)

        layers: list[nn.Module] = [conv(in_channels, channels, 2, True), nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, num_layers + 1):
            out = channels * min(2**n, 8)
            stride = 2 if n < num_layers else 1
            layers += [conv(width, out, stride, False), norm(out), nn.LeakyReLU(0.2)]
            width = out
        layers.append(conv(width, 1, 1, True))
        self.layers = nn.Sequential(*layers)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:  # pix2pix / taming initialisation
        if isinstance(module, nn.Conv2d) and hasattr(module, "weight") and module.weight is not None:
            nn.init.normal_(module.weight, 0.0, 0.02)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.weight, 1.0, 0.02)
            nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def adaptive_generator_weight(
    reconstruction_loss: torch.Tensor,
    generator_loss: torch.Tensor,
    last_layer: torch.Tensor,
    max_weight: float = 1e4,
    eps: float = 1e-4,
) -> torch.Tensor:
    """``||grad rec|| / (||grad gan|| + eps)`` at ``last_layer``, clamped to ``[0, max_weight]``, detached."""
    rec_grad = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (gan_grad.norm() + eps)
    return weight.clamp(0.0, max_weight).detach()


def gradient_penalty(logits_real: torch.Tensor, real_images: torch.Tensor) -> torch.Tensor:
    """R1: mean over the batch of ``||d D(x) / d x||^2`` at real images (which must require grad)."""
    (grad,) = torch.autograd.grad(logits_real.sum(), real_images, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()
