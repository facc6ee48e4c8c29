"""The networks of latent diffusion, as plain ``nn.Module``s from diffusers (usable without Lightning).

- First stage: ``build_autoencoder`` turns "KL or VQ, downsampling factor f, latent channels" into
  diffusers' ``AutoencoderKL`` / ``VQModel`` block lists (one encoder/decoder level per factor of two), so
  YAML never spells those out. ``FirstStage`` gives both kinds one interface (``encode`` to latents,
  ``decode`` to images) following LDM's conventions: a KL latent is the posterior's mode (its sample while
  training the autoencoder), a VQ latent is the encoder output *before* quantisation, and quantisation
  happens in ``decode``. ``load_first_stage`` reads a stage-1 Lightning checkpoint or a diffusers-format
  local directory; nothing is downloaded.
- Denoiser: ``build_denoiser`` makes diffusers' ``UNet2DConditionModel`` (cross-attention) or
  ``DiTTransformer2DModel`` for a latent shape, from a dict of diffusers arguments over small defaults for
  8x8 latents; ``denoise`` calls either with the same tensors. Class labels reach a UNet through its class
  embedding (added to the time embedding, as in ADM) *and* one cross-attention token, a DiT through its
  adaLN-Zero label embedding. diffusers' DiT drops labels itself in training mode (a fixed 10%); that is
  switched off here so the module's condition dropout is the only dropout, while the table keeps its null row.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel, UNet2DConditionModel, VQModel
from torch import nn

__all__ = [
    "AUTOENCODERS",
    "DENOISERS",
    "Denoiser",
    "FirstStage",
    "IdentityFirstStage",
    "build_autoencoder",
    "build_denoiser",
    "denoise",
    "load_first_stage",
    "sharding_block_types",
]

#: ``model_name`` of the first stage -> the diffusers class.
AUTOENCODERS = {"kl": AutoencoderKL, "vq": VQModel}
#: ``model_name`` of the denoiser -> the diffusers class.
DENOISERS = {"unet": UNet2DConditionModel, "dit": DiTTransformer2DModel}
#: What a latent-diffusion denoiser is: one of diffusers' networks, called through ``denoise``.
Denoiser = UNet2DConditionModel | DiTTransformer2DModel

_DEFAULT_MULTIPLIERS = {1: (1,), 2: (1, 2), 4: (1, 2, 2), 8: (1, 2, 2, 4), 16: (1, 2, 2, 4, 4)}
UNET_DEFAULTS = {
    "block_out_channels": (64, 128),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": 1,
    "attention_head_dim": 4,  # diffusers' legacy name: the number of heads
    "norm_num_groups": 32,
}
DIT_DEFAULTS = {"num_layers": 4, "num_attention_heads": 4, "attention_head_dim": 32, "patch_size": 2}


# ---------------------------------------------------------------------------------------------- first stage
def build_autoencoder(
    model_name: str = "kl",
    downsample_factor: int = 4,
    latent_channels: int = 4,
    base_channels: int = 64,
    channel_multipliers: tuple[int, ...] | list[int] | None = None,
    layers_per_block: int = 1,
    num_vq_embeddings: int = 512,
    mid_attention: bool = True,
    norm_num_groups: int = 32,
    in_channels: int = 3,
    img_size: int = 32,
) -> AutoencoderKL | VQModel:
    """A diffusers autoencoder (``model_name`` ``"kl"`` or ``"vq"``) with ``log2(downsample_factor)`` downsamplings.

    ``channel_multipliers`` (one per level, ``log2(f) + 1`` of them) default to LDM's pattern.
    """
    if model_name not in AUTOENCODERS:
        raise ValueError(f"autoencoder model_name must be one of {sorted(AUTOENCODERS)}, got {model_name!r}")
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
        "sample_size": img_size,
        "mid_block_add_attention": mid_attention,
    }
    if model_name == "kl":
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
    def image_channels(self) -> int:
        return int(self.autoencoder.config.in_channels)

    @property
    def latent_channels(self) -> int:
        return int(self.autoencoder.config.latent_channels)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.autoencoder.config.block_out_channels) - 1)

    def last_layer(self) -> torch.Tensor:
        """The decoder's output convolution weight: where LDM measures the adaptive GAN weight."""
        return self.autoencoder.decoder.conv_out.weight

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction (deterministic: the KL posterior's mode)."""
        return self.decode(self.encode(images))

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
        self.image_channels = self.latent_channels = channels

    def encode(self, images: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


def _from_diffusers_dir(path: Path) -> AutoencoderKL | VQModel:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a diffusers model directory: it has no config.json")
    class_name = json.loads(config_file.read_text()).get("_class_name")
    classes = {cls.__name__: cls for cls in AUTOENCODERS.values()}
    if class_name not in classes:
        raise ValueError(
            f"{str(config_file)!r}: _class_name is {class_name!r}; expected one of {sorted(classes)}"
        )
    return classes[class_name].from_pretrained(path, local_files_only=True)


def _from_lightning_checkpoint(path: Path) -> AutoencoderKL | VQModel:
    from zoo.diffusion.checkpoints import upgrade_checkpoint

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint.get("hyper_parameters"), dict) or not isinstance(
        checkpoint.get("state_dict"), dict
    ):
        raise ValueError(f"{str(path)!r} is not a Lightning checkpoint (no hyper_parameters/state_dict)")
    checkpoint = upgrade_checkpoint(checkpoint)
    hparams = checkpoint["hyper_parameters"]
    if hparams.get("model_name") not in AUTOENCODERS:
        raise ValueError(
            f"{str(path)!r} is not a zoo Autoencoder checkpoint: its model_name is {hparams.get('model_name')!r}"
        )
    autoencoder = build_autoencoder(hparams["model_name"], **(hparams.get("model_kwargs") or {}))
    prefix = "model.autoencoder."
    weights = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    autoencoder.load_state_dict(weights)
    return autoencoder


def load_first_stage(source: str | dict | None, image_channels: int = 3) -> nn.Module:
    """A frozen first stage from a stage-1 checkpoint (``.ckpt``), a diffusers directory, an architecture
    dict (the ``Autoencoder``'s ``{"model_name", "model_kwargs"}``: untrained, for smoke runs) or ``None``
    (pixel space, ``image_channels`` channels)."""
    if source is None:
        stage = IdentityFirstStage(image_channels)
    elif isinstance(source, dict):
        unknown = set(source) - {"model_name", "model_kwargs"}
        if unknown:
            raise ValueError(
                "an autoencoder dict holds the Autoencoder's architecture, {model_name: kl | vq, model_kwargs: "
                f"{{...}}}}; got the keys {sorted(unknown)}"
            )
        stage = FirstStage(
            build_autoencoder(source.get("model_name", "kl"), **(source.get("model_kwargs") or {}))
        )
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(
                f"autoencoder {str(path)!r} does not exist (expected a stage-1 .ckpt or a diffusers directory)"
            )
        stage = FirstStage(_from_diffusers_dir(path) if path.is_dir() else _from_lightning_checkpoint(path))
    stage.requires_grad_(False)
    return stage.eval()


# ------------------------------------------------------------------------------------------------ denoiser
def build_denoiser(
    model_name: str,
    sample_size: int,
    in_channels: int,
    out_channels: int,
    context_dim: int,
    num_classes: int = 0,
    model_kwargs: dict | None = None,
) -> Denoiser:
    """A ``"unet"`` or ``"dit"`` predicting noise (or v) for latents of ``sample_size``.

    Args:
        in_channels: latent channels plus any concatenated channels (inpainting); out_channels: latent channels.
        context_dim: width of the cross-attention tokens (UNet).
        num_classes: classes of a class-conditional model (its null class is ``num_classes``); 0 for none.
        model_kwargs: further diffusers constructor arguments, overriding the small defaults.
    """
    if model_name == "unet":
        kwargs = {**UNET_DEFAULTS, **(model_kwargs or {})}
        if num_classes:
            kwargs.setdefault("num_class_embeds", num_classes + 1)
        return UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=out_channels,
            cross_attention_dim=context_dim,
            **kwargs,
        )
    if model_name == "dit":
        if not num_classes:
            raise ValueError("the DiT denoiser is class-conditional: use ClassConditioning with it")
        model = DiTTransformer2DModel(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=out_channels,
            num_embeds_ada_norm=num_classes,
            **{**DIT_DEFAULTS, **(model_kwargs or {})},
        )
        for module in model.modules():  # our condition dropout only; the null row stays
            if hasattr(module, "token_drop") and hasattr(module, "dropout_prob"):
                module.dropout_prob = 0.0
        return model
    raise ValueError(f"the denoiser's model_name must be one of {sorted(DENOISERS)}, got {model_name!r}")


def denoise(
    model: Denoiser,
    sample: torch.Tensor,
    timesteps: torch.Tensor,
    context: torch.Tensor | None = None,
    class_labels: torch.Tensor | None = None,
    context_mask: torch.Tensor | None = None,
    down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
    mid_block_additional_residual: torch.Tensor | None = None,
    time_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The prediction of a UNet (cross-attention ``context``, class embedding, ControlNet residuals, SDXL
    micro-conditions ``time_ids``) or DiT (``class_labels`` only) for a batch of noisy latents.

    ``time_ids`` go through the UNet's ``text_time`` added embedding with an empty pooled text embedding
    (``zoo.diffusion.micro_conditioning``)."""
    if timesteps.ndim == 0:
        timesteps = timesteps.expand(sample.shape[0])
    if isinstance(model, DiTTransformer2DModel):
        if time_ids is not None:
            raise ValueError("diffusers' DiT takes no micro-conditions (time_ids): use the UNet")
        return model(sample, timestep=timesteps, class_labels=class_labels).sample
    added = None
    if time_ids is not None:
        added = {"text_embeds": time_ids.new_zeros(time_ids.shape[0], 0), "time_ids": time_ids}
    return model(
        sample,
        timesteps,
        encoder_hidden_states=context,
        class_labels=class_labels if model.config.num_class_embeds else None,
        encoder_attention_mask=context_mask,
        down_block_additional_residuals=down_block_additional_residuals,
        mid_block_additional_residual=mid_block_additional_residual,
        added_cond_kwargs=added,
    ).sample


def sharding_block_types(model: nn.Module) -> tuple[type[nn.Module], ...]:
    """The repeated blocks of a diffusers UNet (down/mid/up blocks) or DiT (transformer blocks)."""
    from diffusers.models.attention import BasicTransformerBlock

    if isinstance(model, DiTTransformer2DModel):
        return (BasicTransformerBlock,)
    if isinstance(model, UNet2DConditionModel):
        blocks = [*model.down_blocks, *model.up_blocks]
        if model.mid_block is not None:
            blocks.append(model.mid_block)
        return tuple(dict.fromkeys(type(b) for b in blocks))
    return ()
