"""The denoiser: diffusers' ``UNet2DConditionModel`` (cross-attention) or ``DiTTransformer2DModel``.

``Denoiser`` gives both one call, ``denoiser(noisy_latents, timesteps, conditioning)``, and builds them
from a latent shape plus a dict of diffusers arguments (small defaults for 8x8 latents), so YAML
chooses the network with ``denoiser: unet | dit`` and tunes it with ``denoiser_config``.

Class labels reach a UNet through its class embedding (added to the time embedding, as in ADM) *and*
one cross-attention token; a DiT through its adaLN-Zero label embedding. diffusers' DiT drops labels
itself in training mode (a fixed 10%); that is switched off here so the module's
``condition_dropout`` is the only dropout, while the embedding table keeps its null row.
"""

from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel, UNet2DConditionModel
from torch import nn

from zoo.diffusion.conditioning import Conditioning

__all__ = ["Denoiser", "sharding_block_types"]

UNET_DEFAULTS = {
    "block_out_channels": (64, 128),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": 1,
    "attention_head_dim": 4,  # diffusers' legacy name: the number of heads
    "norm_num_groups": 32,
}
DIT_DEFAULTS = {"num_layers": 4, "num_attention_heads": 4, "attention_head_dim": 32, "patch_size": 2}


class Denoiser(nn.Module):
    """Predicts noise (or v) from noisy latents, timesteps and a ``Conditioning``.

    Args:
        kind: ``"unet"`` or ``"dit"``.
        sample_size: latent side; in_channels: latent channels plus any concatenated channels;
        out_channels: latent channels.
        context_dim: width of the cross-attention tokens (UNet).
        num_classes: classes of a class-conditional model (its null class is ``num_classes``); 0 for none.
        config: further diffusers constructor arguments, overriding the small defaults.
    """

    def __init__(
        self,
        kind: str,
        sample_size: int,
        in_channels: int,
        out_channels: int,
        context_dim: int,
        num_classes: int = 0,
        config: dict | None = None,
    ) -> None:
        super().__init__()
        self.kind = kind
        if kind == "unet":
            kwargs = {**UNET_DEFAULTS, **(config or {})}
            if num_classes:
                kwargs.setdefault("num_class_embeds", num_classes + 1)
            self.model = UNet2DConditionModel(
                sample_size=sample_size,
                in_channels=in_channels,
                out_channels=out_channels,
                cross_attention_dim=context_dim,
                **kwargs,
            )
        elif kind == "dit":
            if not num_classes:
                raise ValueError("the DiT denoiser is class-conditional: use conditioning 'class' with it")
            kwargs = {**DIT_DEFAULTS, **(config or {})}
            self.model = DiTTransformer2DModel(
                sample_size=sample_size,
                in_channels=in_channels,
                out_channels=out_channels,
                num_embeds_ada_norm=num_classes,
                **kwargs,
            )
            for module in self.model.modules():  # our condition dropout only; the null row stays
                if hasattr(module, "token_drop") and hasattr(module, "dropout_prob"):
                    module.dropout_prob = 0.0
        else:
            raise ValueError(f"denoiser must be 'unet' or 'dit', got {kind!r}")

    def forward(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Conditioning,
        down_block_additional_residuals=None,
        mid_block_additional_residual=None,
    ) -> torch.Tensor:
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(sample.shape[0])
        if self.kind == "dit":
            return self.model(sample, timestep=timesteps, class_labels=cond.class_labels).sample
        return self.model(
            sample,
            timesteps,
            encoder_hidden_states=cond.context,
            class_labels=cond.class_labels if self.model.config.num_class_embeds else None,
            encoder_attention_mask=cond.context_mask,
            down_block_additional_residuals=down_block_additional_residuals,
            mid_block_additional_residual=mid_block_additional_residual,
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
