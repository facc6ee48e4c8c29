"""The first stage of latent diffusion: diffusers' ``AutoencoderKL`` / ``VQModel``, built from a few numbers.

``build_autoencoder`` turns "KL or VQ, downsampling factor f, latent channels" into the diffusers
block lists (one encoder/decoder level per factor of two), so a YAML file never spells those out.
``FirstStage`` gives both kinds one interface (``encode`` to latents, ``decode`` to images) and is
what the second stage holds frozen; it follows LDM's conventions: a KL latent is the posterior's
mode (its sample while training the autoencoder), a VQ latent is the encoder output *before*
quantisation, and quantisation happens in ``decode``. ``load_first_stage`` reads a stage-1
Lightning checkpoint or a diffusers-format local directory; nothing is downloaded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from diffusers import AutoencoderKL, VQModel
from torch import nn

__all__ = ["FirstStage", "IdentityFirstStage", "build_autoencoder", "load_first_stage"]

_DEFAULT_MULTIPLIERS = {1: (1,), 2: (1, 2), 4: (1, 2, 2), 8: (1, 2, 2, 4), 16: (1, 2, 2, 4, 4)}


def build_autoencoder(
    kind: str = "kl",
    downsample_factor: int = 4,
    latent_channels: int = 4,
    base_channels: int = 64,
    channel_multipliers: tuple[int, ...] | list[int] | None = None,
    layers_per_block: int = 1,
    num_vq_embeddings: int = 512,
    mid_attention: bool = True,
    norm_num_groups: int = 32,
    in_channels: int = 3,
    image_size: int = 32,
) -> AutoencoderKL | VQModel:
    """A diffusers autoencoder with ``log2(downsample_factor)`` downsamplings.

    ``channel_multipliers`` (one per level, ``log2(f) + 1`` of them) default to LDM's pattern.
    """
    if kind not in ("kl", "vq"):
        raise ValueError(f"autoencoder kind must be 'kl' or 'vq', got {kind!r}")
    levels = math.log2(downsample_factor) if downsample_factor > 0 else -1
    if levels != int(levels) or levels < 0:
        raise ValueError(
            f"downsample_factor must be a power of two (1, 2, 4, 8, 16), got {downsample_factor}"
        )
    multipliers = tuple(channel_multipliers or _DEFAULT_MULTIPLIERS.get(downsample_factor, ()))
    if len(multipliers) != int(levels) + 1:
        raise ValueError(
            f"channel_multipliers needs log2({downsample_factor}) + 1 = {int(levels) + 1} entries, got {multipliers}"
        )
    channels = tuple(base_channels * m for m in multipliers)
    if any(c % norm_num_groups for c in channels):
        raise ValueError(
            f"every block width {channels} must be divisible by norm_num_groups={norm_num_groups}"
        )
    common = {
        "in_channels": in_channels,
        "out_channels": in_channels,
        "down_block_types": ("DownEncoderBlock2D",) * len(channels),
        "up_block_types": ("UpDecoderBlock2D",) * len(channels),
        "block_out_channels": channels,
        "layers_per_block": layers_per_block,
        "latent_channels": latent_channels,
        "norm_num_groups": norm_num_groups,
        "sample_size": image_size,
        "mid_block_add_attention": mid_attention,
    }
    if kind == "kl":
        return AutoencoderKL(**common)
    return VQModel(**common, num_vq_embeddings=num_vq_embeddings)


class FirstStage(nn.Module):
    """One interface over ``AutoencoderKL`` and ``VQModel``: images in [-1, 1] <-> unscaled latents."""

    def __init__(self, autoencoder: AutoencoderKL | VQModel) -> None:
        super().__init__()
        if not isinstance(autoencoder, (AutoencoderKL, VQModel)):
            raise TypeError(
                f"expected a diffusers AutoencoderKL or VQModel, got {type(autoencoder).__name__}"
            )
        self.autoencoder = autoencoder

    @property
    def kind(self) -> str:
        return "kl" if isinstance(self.autoencoder, AutoencoderKL) else "vq"

    @property
    def latent_channels(self) -> int:
        return int(self.autoencoder.config.latent_channels)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.autoencoder.config.block_out_channels) - 1)

    def last_layer(self) -> torch.Tensor:
        """The decoder's output convolution weight: where LDM measures the adaptive GAN weight."""
        return self.autoencoder.decoder.conv_out.weight

    def encode(self, images: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        """Latents (unscaled). KL: the posterior mode, or a sample if ``sample``; VQ: pre-quantisation."""
        return self.encode_with_regulariser(images, sample, generator)[0]

    def encode_with_regulariser(
        self, images: torch.Tensor, sample: bool = False, generator=None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(latents, KL per sample)`` for KL (KL is ``None`` for VQ, whose loss comes from ``decode``)."""
        if self.kind == "kl":
            posterior = self.autoencoder.encode(images).latent_dist
            latents = posterior.sample(generator) if sample else posterior.mode()
            return latents, posterior.kl()
        return self.autoencoder.encode(images).latents, None

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decode_with_regulariser(latents)[0]

    def decode_with_regulariser(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(images, codebook + commitment loss)``; the loss is ``None`` for KL."""
        if self.kind == "kl":
            return self.autoencoder.decode(latents).sample, None
        out = self.autoencoder.decode(latents)
        return out.sample, out.commit_loss.mean()


class IdentityFirstStage(nn.Module):
    """Pixel-space diffusion (LDM's ``IdentityFirstStage``): latents are the images themselves."""

    kind = "identity"
    downsample_factor = 1

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.latent_channels = channels

    def encode(self, images: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


def _from_diffusers_dir(path: Path) -> AutoencoderKL | VQModel:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a diffusers model directory: it has no config.json")
    class_name = json.loads(config_file.read_text()).get("_class_name")
    classes = {"AutoencoderKL": AutoencoderKL, "VQModel": VQModel}
    if class_name not in classes:
        raise ValueError(
            f"{str(config_file)!r}: _class_name is {class_name!r}; expected one of {sorted(classes)}"
        )
    return classes[class_name].from_pretrained(path, local_files_only=True)


def _from_lightning_checkpoint(path: Path) -> AutoencoderKL | VQModel:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    hparams = checkpoint.get("hyper_parameters")
    state = checkpoint.get("state_dict")
    if not isinstance(hparams, dict) or not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} is not a Lightning checkpoint (no hyper_parameters/state_dict)")
    from zoo.diffusion.autoencoder import ARCHITECTURE_ARGS

    missing = [k for k in ("kind", "downsample_factor", "latent_channels") if k not in hparams]
    if missing:
        raise ValueError(
            f"{str(path)!r} is not a zoo Autoencoder checkpoint: hyper_parameters lack {missing}"
        )
    autoencoder = build_autoencoder(**{k: hparams[k] for k in ARCHITECTURE_ARGS if k in hparams})
    prefix = "first_stage.autoencoder."
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    autoencoder.load_state_dict(weights)
    return autoencoder


def load_first_stage(source: str | dict | None, image_channels: int = 3) -> nn.Module:
    """A frozen first stage from a stage-1 checkpoint (``.ckpt``), a diffusers directory, an
    architecture dict (``build_autoencoder`` arguments: untrained, for smoke runs) or ``None`` (pixels)."""
    if source is None:
        stage = IdentityFirstStage(image_channels)
    elif isinstance(source, dict):
        stage = FirstStage(build_autoencoder(**source))
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(
                f"autoencoder {str(path)!r} does not exist (expected a stage-1 .ckpt or a diffusers directory)"
            )
        stage = FirstStage(_from_diffusers_dir(path) if path.is_dir() else _from_lightning_checkpoint(path))
    stage.requires_grad_(False)
    return stage.eval()
