"""The adversarial parts of the LDM autoencoder loss, written here because diffusers has no training losses.

- ``PatchDiscriminator``: pix2pix's PatchGAN ("NLayerDiscriminator" in taming-transformers), one logit
  per overlapping patch; BatchNorm by default, or spectral normalisation on every convolution instead.
- ``hinge_discriminator_loss`` / ``hinge_generator_loss``: the hinge GAN losses LDM trains with.
- ``adaptive_generator_weight``: LDM's balance between reconstruction and GAN loss, the ratio of their
  gradient norms at the decoder's last layer, so neither drowns the other as their scales drift.
- ``gradient_penalty``: R1 (Mescheder et al. 2018), a penalty on the discriminator's gradient at real
  images; an alternative to spectral norm for keeping the discriminator smooth.

``AutoencoderLoss`` and ``DiscriminatorConfig`` are the two loss parts of the ``Autoencoder`` module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DISC_REGULARIZERS",
    "AutoencoderLoss",
    "DiscriminatorConfig",
    "PatchDiscriminator",
    "adaptive_generator_weight",
    "gradient_penalty",
    "hinge_discriminator_loss",
    "hinge_generator_loss",
]


DISC_REGULARIZERS = ("none", "gradient_penalty", "spectral_norm")


@dataclass(frozen=True)
class AutoencoderLoss:
    """The autoencoder's reconstruction and regularisation terms (LDM's ``LPIPSWithDiscriminator`` weights).

    Args:
        kl_weight: weight of the KL term (KL autoencoders); LDM's 1e-6 keeps the latents informative.
        codebook_weight: weight of the codebook + commitment loss (VQ autoencoders).
        perceptual_weight: LPIPS weight (LDM uses 1.0); > 0 needs ``perceptual_weights_path``, a local
            file (``zoo.diffusion.perceptual``): nothing is downloaded.
        learn_logvar: LDM's learned scalar log-variance on the reconstruction NLL.
    """

    kl_weight: float = 1e-6
    codebook_weight: float = 1.0
    perceptual_weight: float = 0.0
    perceptual_weights_path: str | None = None
    learn_logvar: bool = True


@dataclass(frozen=True)
class DiscriminatorConfig:
    """The PatchGAN and its schedule.

    Args:
        start: generator steps before the discriminator (and its loss) switch on.
        weight: scale of the adaptive generator weight (LDM 0.5); 0 disables the GAN.
        factor: multiplier of both GAN losses once they are on.
        layers / channels: depth (stride-2 stages) and base width of the PatchGAN.
        regularizer: ``"none"``, ``"gradient_penalty"`` (R1, weight ``gp_weight``) or ``"spectral_norm"``.
    """

    start: int = 2000
    weight: float = 0.5
    factor: float = 1.0
    layers: int = 3
    channels: int = 64
    regularizer: str = "none"
    gp_weight: float = 10.0

    def __post_init__(self) -> None:
        if self.regularizer not in DISC_REGULARIZERS:
            raise ValueError(
                f"the discriminator's regularizer must be one of {DISC_REGULARIZERS}, got {self.regularizer!r}"
            )

    def build(self, in_channels: int = 3) -> PatchDiscriminator:
        return PatchDiscriminator(
            in_channels, self.channels, self.layers, spectral_norm=self.regularizer == "spectral_norm"
        )


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
