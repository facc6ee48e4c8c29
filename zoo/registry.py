"""The model registry: each runnable config with its task and parameter count.

A registered model *is* its YAML file (``configs/<family>/<variant>.yaml``, shipped inside the
package as ``zoo.configs``): the parameter count is measured by building the model from that
file, with the same data-to-model links the CLI applies, on the meta device (no memory, no
weights), so the table can never drift from what ``zoo fit`` trains.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

__all__ = ["MODELS", "ModelEntry", "config_path", "list_models"]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    config: str  # relative to the configs folder, e.g. "vision/deit_tiny.yaml"
    task: str
    description: str
    parameters: int | None = field(default=None, compare=False)

    @property
    def config_path(self) -> Path:
        return config_path(self.config)


MODELS: tuple[ModelEntry, ...] = (
    ModelEntry("vit_tiny", "vision/vit_tiny.yaml", "image-classification", "ViT-Ti/4 on 32 px images"),
    ModelEntry(
        "deit_tiny",
        "vision/deit_tiny.yaml",
        "image-classification",
        "DeiT-Ti/8 with a conv stem, the default `make train` job",
    ),
    ModelEntry(
        "deit_tiny_distilled",
        "vision/deit_tiny_distilled.yaml",
        "image-classification",
        "DeiT-Ti/8 with a distillation token; eval averages both heads",
    ),
    ModelEntry(
        "swin_tiny", "vision/swin_tiny.yaml", "image-classification", "Swin-T, patch 2 / window 4 for 32 px"
    ),
    ModelEntry(
        "vpt_shallow",
        "vision/vpt_shallow.yaml",
        "image-classification",
        "VPT-shallow: prompts at the input only",
    ),
    ModelEntry(
        "vpt_deep", "vision/vpt_deep.yaml", "image-classification", "VPT-deep: new prompts at every layer"
    ),
    ModelEntry(
        "esm2_t6_8M",
        "protein/esm2_t6_8M.yaml",
        "masked-language-modelling",
        "ESM-2 t6_8M (fair-esm compatible) on the embedded real proteins",
    ),
    ModelEntry(
        "esm2_t6_8M_membrane",
        "protein/esm2_t6_8M_membrane.yaml",
        "sequence-classification",
        "ESM-2 t6_8M + head (LoRA optional): membrane vs soluble proteins",
    ),
    ModelEntry(
        "esm2_t6_8M_UR50D",
        "protein/sizes/esm2_t6_8M_UR50D.yaml",
        "masked-language-modelling",
        "ESM-2 t6_8M as published, pre-training recipe (GPU clusters; built, not run, by tests)",
    ),
    ModelEntry(
        "esm2_t12_35M_UR50D",
        "protein/sizes/esm2_t12_35M_UR50D.yaml",
        "masked-language-modelling",
        "ESM-2 t12_35M as published, pre-training recipe (GPU clusters; built, not run, by tests)",
    ),
    ModelEntry(
        "esm2_t30_150M_UR50D",
        "protein/sizes/esm2_t30_150M_UR50D.yaml",
        "masked-language-modelling",
        "ESM-2 t30_150M as published, pre-training recipe (GPU clusters; built, not run, by tests)",
    ),
    ModelEntry(
        "esm2_t33_650M_UR50D",
        "protein/sizes/esm2_t33_650M_UR50D.yaml",
        "masked-language-modelling",
        "ESM-2 t33_650M as published, pre-training recipe (GPU clusters; built, not run, by tests)",
    ),
    ModelEntry(
        "esm2_t36_3B_UR50D",
        "protein/sizes/esm2_t36_3B_UR50D.yaml",
        "masked-language-modelling",
        "ESM-2 t36_3B as published, pre-training recipe (GPU clusters; built, not run, by tests)",
    ),
    ModelEntry(
        "esm2_t48_15B_UR50D",
        "protein/sizes/esm2_t48_15B_UR50D.yaml",
        "masked-language-modelling",
        "ESM-2 t48_15B as published, pre-training recipe (GPU clusters; built, not run, by tests)",
    ),
    ModelEntry(
        "bevformer_cpu",
        "bev/bevformer_cpu.yaml",
        "multi-camera-3d-detection",
        "BEVFormer (ResNet-18, 32x32 BEV, 1 history frame) on the embedded synthetic 6-camera driving scenes",
    ),
    ModelEntry(
        "bevformer_tiny",
        "bev/sizes/bevformer_tiny.yaml",
        "multi-camera-3d-detection",
        "BEVFormer-tiny as published (ResNet-50, 50x50 BEV); nuScenes recipe (GPUs; built, not run, by tests)",
    ),
    ModelEntry(
        "bevformer_small",
        "bev/sizes/bevformer_small.yaml",
        "multi-camera-3d-detection",
        "BEVFormer-small shapes (ResNet-101 without DCN, 150x150 BEV); nuScenes recipe (built, not run, by tests)",
    ),
    ModelEntry(
        "bevformer_base",
        "bev/sizes/bevformer_base.yaml",
        "multi-camera-3d-detection",
        "BEVFormer-base shapes (ResNet-101 without DCN, 4 levels, 200x200 BEV); nuScenes recipe (built, not run)",
    ),
    ModelEntry(
        "multitask_arithmetic",
        "multitask/arithmetic.yaml",
        "multitask-text",
        "Shared-encoder multitask Transformer: well-formed? / token roles / value generation; static weights",
    ),
    ModelEntry(
        "multitask_arithmetic_uncertainty",
        "multitask/arithmetic_uncertainty.yaml",
        "multitask-text",
        "Multitask arithmetic with uncertainty weighting (Kendall et al. 2018)",
    ),
    ModelEntry(
        "multitask_arithmetic_dwa",
        "multitask/arithmetic_dwa.yaml",
        "multitask-text",
        "Multitask arithmetic with Dynamic Weight Average (Liu et al. 2019)",
    ),
    ModelEntry(
        "multitask_arithmetic_gradnorm",
        "multitask/arithmetic_gradnorm.yaml",
        "multitask-text",
        "Multitask arithmetic with GradNorm (Chen et al. 2018), alpha 1.5",
    ),
    ModelEntry(
        "multitask_arithmetic_loss_trend",
        "multitask/arithmetic_loss_trend.yaml",
        "multitask-text",
        "Multitask arithmetic; weights raised for tasks whose loss stalls",
    ),
    ModelEntry(
        "autoencoder_kl_f4",
        "diffusion/autoencoder_kl_f4.yaml",
        "image-autoencoding",
        "LDM stage 1: KL autoencoder f4 (32 px -> 8x8x8), L1 + KL + PatchGAN; params include the discriminator",
    ),
    ModelEntry(
        "autoencoder_vq_f4",
        "diffusion/autoencoder_vq_f4.yaml",
        "image-autoencoding",
        "LDM stage 1: VQ autoencoder f4, 512 codes, spectrally normalised PatchGAN",
    ),
    ModelEntry(
        "ldm_unet_class",
        "diffusion/ldm_unet_class.yaml",
        "class-to-image",
        "Latent diffusion, UNet2DConditionModel, class labels + classifier-free guidance (params include the frozen AE)",
    ),
    ModelEntry(
        "ldm_unet_caption",
        "diffusion/ldm_unet_caption.yaml",
        "text-to-image",
        "Latent diffusion, cross-attention UNet, captions through a jointly trained text transformer",
    ),
    ModelEntry(
        "ldm_dit_class",
        "diffusion/ldm_dit_class.yaml",
        "class-to-image",
        "Latent diffusion with a DiT denoiser (adaLN-Zero, patch 2), class labels, guidance",
    ),
    ModelEntry(
        "ldm_lora",
        "diffusion/ldm_lora.yaml",
        "class-to-image",
        "LoRA (peft, rank 8) on ldm_unet_class's attention; adapters saved apart from the base",
    ),
    ModelEntry(
        "controlnet",
        "diffusion/controlnet.yaml",
        "class-to-image",
        "ControlNet on a frozen ldm_unet_class, steered by each image's edge map",
    ),
)


def config_path(relative: str) -> Path:
    """Absolute path of a config shipped in ``zoo.configs`` (works from a clone and from a wheel)."""
    path = Path(str(resources.files("zoo.configs").joinpath(relative)))
    if not path.is_file():
        raise FileNotFoundError(f"config {relative!r} is not in {path.parent}")
    return path


@functools.cache
def count_parameters(relative_config: str) -> int:
    """Build the config's model as ``zoo fit`` would, on the meta device, and count its parameters."""
    import torch

    from zoo.cli import ZooCLI

    with torch.device("meta"):
        cli = ZooCLI(
            args=["--config", str(config_path(relative_config)), "--trainer.logger=false"],
            run=False,
            save_config_callback=None,
        )
    return sum(p.numel() for p in cli.model.parameters())


def list_models(with_parameters: bool = True) -> list[ModelEntry]:
    """Every registered model; ``with_parameters`` measures each one's parameter count."""
    if not with_parameters:
        return list(MODELS)
    return [ModelEntry(m.name, m.config, m.task, m.description, count_parameters(m.config)) for m in MODELS]
