"""Latent diffusion (Rombach et al. 2022) on diffusers' models and schedulers.

Stage 1, ``Autoencoder``: a KL or VQ autoencoder trained with L1 (+ LPIPS), KL or codebook loss and a
PatchGAN. Stage 2, ``LatentDiffusion``: a UNet or DiT denoiser on the frozen autoencoder's latents, built
from swappable parts (conditioning, objective, sampling, LoRA) and sampled by
``zoo.diffusion.sampling.sample``; LoRA and ``ControlNetDiffusion`` fine-tune it, ``DreamBooth`` and
``TextualInversion`` personalise it. See ``zoo/diffusion/README.md``.
"""

from zoo.diffusion.autoencoder import Autoencoder
from zoo.diffusion.callbacks import SampleGridLogger
from zoo.diffusion.checkpoints import upgrade_checkpoint
from zoo.diffusion.conditioning import (
    CaptionConditioning,
    ClassConditioning,
    Conditioning,
    ConditioningConfig,
    NoConditioning,
)
from zoo.diffusion.controlnet import ControlNetDiffusion
from zoo.diffusion.dreambooth import DreamBooth, PriorPreservation
from zoo.diffusion.losses import AutoencoderLoss, DiscriminatorConfig
from zoo.diffusion.model import (
    Denoiser,
    FirstStage,
    IdentityFirstStage,
    build_autoencoder,
    build_denoiser,
    denoise,
    load_first_stage,
)
from zoo.diffusion.module import LatentDiffusion
from zoo.diffusion.sampling import SamplingConfig, guided, sample
from zoo.diffusion.schedules import DiffusionObjective
from zoo.diffusion.textual_inversion import TextualInversion, load_textual_inversion
from zoo.lora import LoRAConfig

__all__ = [
    "Autoencoder",
    "AutoencoderLoss",
    "CaptionConditioning",
    "ClassConditioning",
    "Conditioning",
    "ConditioningConfig",
    "ControlNetDiffusion",
    "Denoiser",
    "DiffusionObjective",
    "DiscriminatorConfig",
    "DreamBooth",
    "FirstStage",
    "IdentityFirstStage",
    "LatentDiffusion",
    "LoRAConfig",
    "NoConditioning",
    "PriorPreservation",
    "SampleGridLogger",
    "SamplingConfig",
    "TextualInversion",
    "build_autoencoder",
    "build_denoiser",
    "denoise",
    "guided",
    "load_first_stage",
    "load_textual_inversion",
    "sample",
    "upgrade_checkpoint",
]
