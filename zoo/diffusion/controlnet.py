"""``ControlNetDiffusion``: a ControlNet (Zhang et al. 2023; diffusers ``ControlNetModel``) on a frozen base.

The ControlNet is a trainable copy of the base UNet's encoder (``ControlNetModel.from_unet``), fed the
noisy latents plus an embedded conditioning image, whose zero-initialised outputs are added to the
base UNet's skip connections; only it trains, so the base model's behaviour is the starting point. The
conditioning image is derived from the data itself, the Sobel edge map of each image
(``zoo.diffusion.images.edge_map``), so the embedded shapes need no annotation. Its embedding network
downsamples by the autoencoder's factor (one stride-2 stage per factor of two) to reach latent size.
diffusers' ``ControlNetModel.forward`` takes no cross-attention padding mask, so with captions the
ControlNet (not the base UNet) also attends to padding tokens.
"""

from __future__ import annotations

import math

import torch
from diffusers import ControlNetModel

from zoo.diffusion.conditioning import Conditioning
from zoo.diffusion.images import edge_map
from zoo.diffusion.module import LatentDiffusion

__all__ = ["ControlNetDiffusion"]


class ControlNetDiffusion(LatentDiffusion):
    """``LatentDiffusion`` whose frozen UNet is steered by a trained ControlNet.

    Args:
        base_checkpoint: the trained ``LatentDiffusion`` to control (``None`` builds an untrained base: smoke runs).
        control: ``"edges"`` (binary Sobel edges) or ``"soft_edges"`` (gradient magnitude).
        conditioning_scale: multiplier of the ControlNet residuals.
        control_channels: widths of the conditioning-image embedding's stages; default 16, 32, 64...,
            one stage per factor of two of downsampling plus one.
        All other arguments are ``LatentDiffusion``'s (they must match the base checkpoint's).
    """

    def __init__(
        self,
        control: str = "edges",
        conditioning_scale: float = 1.0,
        control_channels: list[int] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if control not in ("edges", "soft_edges"):
            raise ValueError(f"control must be 'edges' or 'soft_edges', got {control!r}")
        if self.denoiser.kind != "unet":
            raise ValueError("ControlNet needs the UNet denoiser (denoiser: unet)")
        if self.hparams.lora_rank:
            raise ValueError("train LoRA and ControlNet in separate runs")
        self.control = control
        self.conditioning_scale = conditioning_scale
        stages = int(math.log2(self.first_stage.downsample_factor)) + 1
        channels = tuple(control_channels or (16 * 2**i for i in range(stages)))
        if len(channels) != stages:
            raise ValueError(
                f"control_channels needs {stages} entries for downsampling factor {2 ** (stages - 1)}"
            )
        self.requires_grad_(False)  # the base stays frozen
        self.controlnet = ControlNetModel.from_unet(
            self.denoiser.model, conditioning_embedding_out_channels=channels, conditioning_channels=1
        )
        self.controlnet.requires_grad_(True)

    def control_image(self, batch: dict) -> torch.Tensor:
        return edge_map(batch["image"].to(self.device), threshold=0.2 if self.control == "edges" else None)

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Conditioning,
        concat: torch.Tensor | None = None,
        control: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if control is None:
            raise ValueError("ControlNetDiffusion needs a control image (the edge map of an image)")
        if concat is not None:
            noisy_latents = torch.cat([noisy_latents, concat], dim=1)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(noisy_latents.shape[0])
        uses_labels = bool(self.controlnet.config.num_class_embeds)
        down, mid = self.controlnet(
            noisy_latents,
            timesteps,
            encoder_hidden_states=cond.context,
            controlnet_cond=control,
            conditioning_scale=self.conditioning_scale,
            class_labels=cond.class_labels if uses_labels else None,
            return_dict=False,
        )
        return self.denoiser(noisy_latents, timesteps, cond, down, mid)
