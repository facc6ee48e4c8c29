"""Latent diffusion (Rombach et al. 2022) on diffusers' models and schedulers.

Stage 1, ``Autoencoder``: a KL or VQ autoencoder trained with L1 (+ LPIPS), KL or codebook loss and a
PatchGAN. Stage 2, ``LatentDiffusion``: a UNet or DiT denoiser on the frozen autoencoder's latents,
conditioned on class labels or captions, sampled by ``zoo.diffusion.sampling.sample``; LoRA and
``ControlNetDiffusion`` fine-tune it. See ``zoo/diffusion/README.md``.
"""

from zoo.diffusion.autoencoder import Autoencoder
from zoo.diffusion.callbacks import SampleGridLogger, SampleGridWriter
from zoo.diffusion.conditioning import Conditioning
from zoo.diffusion.controlnet import ControlNetDiffusion
from zoo.diffusion.denoiser import Denoiser
from zoo.diffusion.first_stage import FirstStage, IdentityFirstStage, build_autoencoder, load_first_stage
from zoo.diffusion.module import LatentDiffusion
from zoo.diffusion.sampling import guided, sample

__all__ = [
    "Autoencoder",
    "Conditioning",
    "ControlNetDiffusion",
    "Denoiser",
    "FirstStage",
    "IdentityFirstStage",
    "LatentDiffusion",
    "SampleGridLogger",
    "SampleGridWriter",
    "build_autoencoder",
    "guided",
    "load_first_stage",
    "sample",
]
