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

from zoo.diffusion.images import edge_map
from zoo.diffusion.model import denoise
from zoo.diffusion.module import LatentDiffusion
from zoo.parts import plain_part

__all__ = ["ControlNetDiffusion"]

CONTROLS = ("edges", "soft_edges")


class ControlNetDiffusion(LatentDiffusion):
    """``LatentDiffusion`` whose frozen UNet is steered by a trained ControlNet.

    Args:
        base_checkpoint: the trained ``LatentDiffusion`` to control (``None`` builds an untrained base: smoke runs).
        control: ``"edges"`` (binary Sobel edges) or ``"soft_edges"`` (gradient magnitude).
        conditioning_scale: multiplier of the ControlNet residuals.
        control_channels: widths of the conditioning-image embedding's stages; default 16, 32, 64...,
            one stage per factor of two of downsampling plus one.
        img_size / num_classes / caption_vocabulary: what the data module links (named here, as the CLI
            links only arguments a constructor names).
        All other arguments are ``LatentDiffusion``'s parts (they must match the base checkpoint's).
    """

    def __init__(
        self,
        control: str = "edges",
        conditioning_scale: float = 1.0,
        control_channels: list[int] | None = None,
        img_size: int = 32,
        num_classes: int = 0,
        caption_vocabulary: list[str] | None = None,
        **kwargs,
    ) -> None:
        if control not in CONTROLS:
            raise ValueError(f"control must be one of {CONTROLS}, got {control!r}")
        if kwargs.get("model_name", "unet") != "unet":
            raise ValueError("ControlNet needs the UNet denoiser (model_name: unet)")
        if kwargs.get("lora") is not None:
            raise ValueError("train LoRA and ControlNet in separate runs")
        # the parts as plain data here too: Lightning saves this frame's arguments over LatentDiffusion's
        kwargs = {k: plain_part(v, self.parts[k]) if k in self.parts else v for k, v in kwargs.items()}
        super().__init__(
            img_size=img_size, num_classes=num_classes, caption_vocabulary=caption_vocabulary, **kwargs
        )

    def configure_models(self) -> None:
        super().configure_models()
        stages = int(math.log2(self.first_stage.downsample_factor)) + 1
        channels = tuple(self.hparams.control_channels or (16 * 2**i for i in range(stages)))
        if len(channels) != stages:
            raise ValueError(
                f"control_channels needs {stages} entries for downsampling factor {2 ** (stages - 1)}"
            )
        self.requires_grad_(False)  # the base stays frozen
        self.controlnet = ControlNetModel.from_unet(
            self.model, conditioning_embedding_out_channels=channels, conditioning_channels=1
        )
        self.controlnet.requires_grad_(True)

    def compiled_networks(self) -> list[torch.nn.Module]:
        """The ControlNet beside the frozen UNet: both run at every training step."""
        return [self.model, self.controlnet]

    def control_image(self, batch: dict) -> torch.Tensor:
        threshold = 0.2 if self.hparams.control == "edges" else None
        return edge_map(batch["image"].to(self.device), threshold=threshold)

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        control: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if control is None:
            raise ValueError("ControlNetDiffusion needs a control image (the edge map of an image)")
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(noisy_latents.shape[0])
        uses_labels = bool(self.controlnet.config.num_class_embeds)
        down, mid = self.controlnet(
            noisy_latents,
            timesteps,
            encoder_hidden_states=context,
            controlnet_cond=control,
            conditioning_scale=self.hparams.conditioning_scale,
            class_labels=class_labels if uses_labels else None,
            return_dict=False,
        )
        return denoise(self.model, noisy_latents, timesteps, context, class_labels, context_mask, down, mid)

    def example_inputs(self, batch_size: int = 2) -> tuple[torch.Tensor | None, ...]:
        """``LatentDiffusion``'s inputs (``None`` for missing condition tensors), then an edge map."""
        inputs = list(super().example_inputs(batch_size))
        inputs += [None] * (5 - len(inputs))
        side = self.hparams.img_size
        edges = (
            torch.rand(batch_size, 1, side, side, generator=torch.Generator().manual_seed(1)) > 0.8
        ).float()
        return (*inputs, edges.to(self.device))
