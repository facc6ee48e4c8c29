"""The model registry: each runnable config with its task and parameter count, and config lookup by name.

A registered model *is* its YAML file (``configs/<family>/<variant>.yaml``, shipped inside the package as
``zoo.configs``). Parameter counts are stored here so that ``zoo list`` and ``zoo.list_models()`` answer at
once, without building 29 models; ``measure_parameters`` builds a config's model as ``zoo fit`` would, on the
meta device (no memory, no weights), and a test checks every stored count against it.

This module imports nothing heavy: ``zoo list`` and the CLI's argument preparation use it before Lightning
or any family is imported.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

__all__ = [
    "CLASS_MODULES",
    "MODELS",
    "ModelEntry",
    "config_path",
    "import_class",
    "import_named_classes",
    "list_models",
    "measure_parameters",
    "resolve_config",
]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    config: str  # relative to the configs folder, e.g. "vision/deit_tiny.yaml"
    task: str
    description: str
    parameters: int  # measured by ``measure_parameters``; a test keeps it current

    @property
    def config_path(self) -> Path:
        return config_path(self.config)


MODELS: tuple[ModelEntry, ...] = (
    ModelEntry(
        "vit_tiny",
        "vision/vit_tiny.yaml",
        "image-classification",
        "ViT-Ti/4 on 32 px images",
        parameters=5363148,
    ),
    ModelEntry(
        "deit_tiny",
        "vision/deit_tiny.yaml",
        "image-classification",
        "DeiT-Ti/8 with a conv stem, the default `make train` job",
        parameters=5590908,
    ),
    ModelEntry(
        "deit_tiny_distilled",
        "vision/deit_tiny_distilled.yaml",
        "image-classification",
        "DeiT-Ti/8 with a distillation token; eval averages both heads",
        parameters=5593608,
    ),
    ModelEntry(
        "swin_tiny",
        "vision/swin_tiny.yaml",
        "image-classification",
        "Swin-T, patch 2 / window 4 for 32 px",
        parameters=27506646,
    ),
    ModelEntry(
        "vpt_shallow",
        "vision/vpt_shallow.yaml",
        "image-classification",
        "VPT-shallow: prompts at the input only",
        parameters=5576500,
    ),
    ModelEntry(
        "vpt_deep",
        "vision/vpt_deep.yaml",
        "image-classification",
        "VPT-deep: new prompts at every layer",
        parameters=5597620,
    ),
    ModelEntry(
        "esm2_t6_8M",
        "protein/esm2_t6_8M.yaml",
        "masked-language-modelling",
        "ESM-2 t6_8M (fair-esm compatible) on the embedded real proteins",
        parameters=7512474,
    ),
    ModelEntry(
        "esm2_t6_8M_membrane",
        "protein/esm2_t6_8M_membrane.yaml",
        "sequence-classification",
        "ESM-2 t6_8M + head (LoRA optional): membrane vs soluble proteins",
        parameters=7615836,
    ),
    ModelEntry(
        "esm2_t6_8M_UR50D",
        "protein/sizes/esm2_t6_8M_UR50D.yaml",
        "masked-language-modelling",
        "ESM-2 t6_8M as published, pre-training recipe (GPU clusters; built, not run, by tests)",
        parameters=7512474,
    ),
    ModelEntry(
        "esm2_t12_35M_UR50D",
        "protein/sizes/esm2_t12_35M_UR50D.yaml",
        "masked-language-modelling",
        "ESM-2 t12_35M as published, pre-training recipe (GPU clusters; built, not run, by tests)",
        parameters=33501394,
    ),
    ModelEntry(
        "esm2_t30_150M_UR50D",
        "protein/sizes/esm2_t30_150M_UR50D.yaml",
        "masked-language-modelling",
        "ESM-2 t30_150M as published, pre-training recipe (GPU clusters; built, not run, by tests)",
        parameters=148140154,
    ),
    ModelEntry(
        "esm2_t33_650M_UR50D",
        "protein/sizes/esm2_t33_650M_UR50D.yaml",
        "masked-language-modelling",
        "ESM-2 t33_650M as published, pre-training recipe (GPU clusters; built, not run, by tests)",
        parameters=651043254,
    ),
    ModelEntry(
        "esm2_t36_3B_UR50D",
        "protein/sizes/esm2_t36_3B_UR50D.yaml",
        "masked-language-modelling",
        "ESM-2 t36_3B as published, pre-training recipe (GPU clusters; built, not run, by tests)",
        parameters=2839005634,
    ),
    ModelEntry(
        "esm2_t48_15B_UR50D",
        "protein/sizes/esm2_t48_15B_UR50D.yaml",
        "masked-language-modelling",
        "ESM-2 t48_15B as published, pre-training recipe (GPU clusters; built, not run, by tests)",
        parameters=15129100194,
    ),
    ModelEntry(
        "bevformer_cpu",
        "bev/bevformer_cpu.yaml",
        "multi-camera-3d-detection",
        "BEVFormer (ResNet-18, 32x32 BEV, 1 history frame) on the embedded synthetic 6-camera driving scenes",
        parameters=1165472,
    ),
    ModelEntry(
        "bevformer_planning",
        "bev/bevformer_planning.yaml",
        "end-to-end-planning",
        "BEVFormer (bevformer_cpu) + a VAD-style planning head, detection and planning trained jointly on the "
        "synthetic scenes where the ego brakes for obstacles",
        parameters=1336020,
    ),
    ModelEntry(
        "bevformer_tiny",
        "bev/sizes/bevformer_tiny.yaml",
        "multi-camera-3d-detection",
        "BEVFormer-tiny as published (ResNet-50, 50x50 BEV); nuScenes recipe (GPUs; built, not run, by tests)",
        parameters=33521147,
    ),
    ModelEntry(
        "bevformer_small",
        "bev/sizes/bevformer_small.yaml",
        "multi-camera-3d-detection",
        "BEVFormer-small shapes (ResNet-101 without DCN, 150x150 BEV); nuScenes recipe (built, not run, by tests)",
        parameters=57658875,
    ),
    ModelEntry(
        "bevformer_base",
        "bev/sizes/bevformer_base.yaml",
        "multi-camera-3d-detection",
        "BEVFormer-base shapes (ResNet-101 without DCN, 4 levels, 200x200 BEV); nuScenes recipe (built, not run)",
        parameters=67230203,
    ),
    ModelEntry(
        "multitask_arithmetic",
        "multitask/arithmetic.yaml",
        "multitask-text",
        "Shared-encoder multitask Transformer: well-formed? / token roles / value generation; static weights",
        parameters=1577244,
    ),
    ModelEntry(
        "multitask_arithmetic_uncertainty",
        "multitask/arithmetic_uncertainty.yaml",
        "multitask-text",
        "Multitask arithmetic with uncertainty weighting (Kendall et al. 2018)",
        parameters=1577247,
    ),
    ModelEntry(
        "multitask_arithmetic_dwa",
        "multitask/arithmetic_dwa.yaml",
        "multitask-text",
        "Multitask arithmetic with Dynamic Weight Average (Liu et al. 2019)",
        parameters=1577244,
    ),
    ModelEntry(
        "multitask_arithmetic_gradnorm",
        "multitask/arithmetic_gradnorm.yaml",
        "multitask-text",
        "Multitask arithmetic with GradNorm (Chen et al. 2018), alpha 1.5",
        parameters=1577247,
    ),
    ModelEntry(
        "multitask_arithmetic_loss_trend",
        "multitask/arithmetic_loss_trend.yaml",
        "multitask-text",
        "Multitask arithmetic; weights raised for tasks whose loss stalls",
        parameters=1577244,
    ),
    ModelEntry(
        "autoencoder_kl_f4",
        "diffusion/autoencoder_kl_f4.yaml",
        "image-autoencoding",
        "LDM stage 1: KL autoencoder f4 (32 px -> 8x8x8), L1 + KL + PatchGAN; params include the discriminator",
        parameters=1383773,
    ),
    ModelEntry(
        "autoencoder_vq_f4",
        "diffusion/autoencoder_vq_f4.yaml",
        "image-autoencoding",
        "LDM stage 1: VQ autoencoder f4, 512 codes, spectrally normalised PatchGAN",
        parameters=1374160,
    ),
    ModelEntry(
        "ldm_unet_class",
        "diffusion/ldm_unet_class.yaml",
        "class-to-image",
        "Latent diffusion, UNet2DConditionModel, class labels + classifier-free guidance (params include the frozen AE)",
        parameters=3850499,
    ),
    ModelEntry(
        "ldm_unet_caption",
        "diffusion/ldm_unet_caption.yaml",
        "text-to-image",
        "Latent diffusion, cross-attention UNet, captions through a jointly trained text transformer",
        parameters=4988931,
    ),
    ModelEntry(
        "ldm_dit_class",
        "diffusion/ldm_dit_class.yaml",
        "class-to-image",
        "Latent diffusion with a DiT denoiser (adaLN-Zero, patch 2), class labels, guidance",
        parameters=2123739,
    ),
    ModelEntry(
        "ldm_lora",
        "diffusion/ldm_lora.yaml",
        "class-to-image",
        "LoRA (peft, rank 8) on ldm_unet_class's attention; adapters saved apart from the base",
        parameters=3890435,
    ),
    ModelEntry(
        "controlnet",
        "diffusion/controlnet.yaml",
        "class-to-image",
        "ControlNet on a frozen ldm_unet_class, steered by each image's edge map",
        parameters=5544115,
    ),
    ModelEntry(
        "ldm_micro_conditioning",
        "diffusion/ldm_micro_conditioning.yaml",
        "class-to-image",
        "ldm_unet_class conditioned on original size and crop (SDXL), trained on random crops",
        parameters=4014851,
    ),
    ModelEntry(
        "ldm_refiner",
        "diffusion/ldm_refiner.yaml",
        "class-to-image",
        "A refiner: ldm_unet_class trained on the low-noise end of the schedule only (SDXL's hand-over)",
        parameters=3850499,
    ),
    ModelEntry(
        "dreambooth",
        "diffusion/dreambooth.yaml",
        "class-to-image",
        "DreamBooth: ldm_unet_class fine-tuned on 5 images of a new instance under a new class id, with prior "
        "preservation",
        parameters=3850819,
    ),
    ModelEntry(
        "textual_inversion",
        "diffusion/textual_inversion.yaml",
        "text-to-image",
        "Textual inversion: a frozen ldm_unet_caption learns one new word's embedding (diffusers' "
        "learned_embeds file)",
        parameters=4988995,
    ),
)


#: Where the zoo's classes that configs name by short name live. ``zoo fit`` imports only the modules its
#: configs and flags name, so a run loads one family, not five (diffusers alone takes seconds to import).
CLASS_MODULES: dict[str, str] = {
    **dict.fromkeys(["ImageClassifier", "VisualPromptTuning"], "zoo.vision"),
    **dict.fromkeys(["ImageClassificationDataModule"], "zoo.datamodules.images"),
    **dict.fromkeys(["ESM2MaskedLM", "ESM2SequencePredictor", "ESM2ResiduePredictor"], "zoo.protein"),
    **dict.fromkeys(["ProteinDataModule"], "zoo.datamodules.proteins"),
    **dict.fromkeys(["ProteinLabelDataModule"], "zoo.datamodules.protein_labels"),
    **dict.fromkeys(
        [
            "MultitaskModule",
            "StaticWeighting",
            "UncertaintyWeighting",
            "DynamicWeightAverage",
            "GradNorm",
            "LossTrend",
        ],
        "zoo.multitask",
    ),
    **dict.fromkeys(["MultitaskDataModule"], "zoo.datamodules.multitask"),
    **dict.fromkeys(["BEVFormerDetector", "BEVFormerPlanner", "EgoStatusPlanner"], "zoo.bev"),
    **dict.fromkeys(["BEVDetectionDataModule"], "zoo.datamodules.bev"),
    **dict.fromkeys(
        [
            "LatentDiffusion",
            "Autoencoder",
            "ControlNetDiffusion",
            "SampleGridLogger",
            "ClassConditioning",
            "CaptionConditioning",
            "NoConditioning",
            "DreamBooth",
            "TextualInversion",
            "PriorPreservation",
        ],
        "zoo.diffusion",
    ),
    **dict.fromkeys(["CaptionedImageDataModule"], "zoo.datamodules.captioned_images"),
    **dict.fromkeys(["InstanceImageDataModule"], "zoo.datamodules.instance_images"),
    **dict.fromkeys(
        [
            "EMA",
            "Distillation",
            "SelfDistillation",
            "TrainingMonitor",
            "MagnitudePruning",
            "StructuredPruning",
            "Quantization",
            "WeightSharing",
        ],
        "zoo.callbacks",
    ),
    **dict.fromkeys(["ShardingUnitsFSDP", "ShardingUnitsDeepSpeed"], "zoo.strategies"),
    **dict.fromkeys(["WarmupCosineLR"], "zoo.optim"),
    **dict.fromkeys(["RecordPredictionWriter"], "zoo.predict"),
}
#: Every family, imported when a config names a class this table does not know (a user's own subclass...).
FAMILIES = ("zoo.vision", "zoo.protein", "zoo.multitask", "zoo.bev", "zoo.diffusion", "zoo.datamodules",
            "zoo.callbacks", "zoo.strategies")  # fmt: skip
#: Where Lightning and torch keep the classes configs name by short name (registered by importing Lightning).
_EXTERNAL_MODULES = ("torch.optim", "torch.optim.lr_scheduler", "lightning.pytorch.callbacks",
                     "lightning.pytorch.strategies", "lightning.pytorch.loggers", "lightning.pytorch.plugins")  # fmt: skip


def import_named_classes(args: Sequence[str], configs: Iterable[str] = ()) -> None:
    """Import the modules of the classes that ``args`` and the YAML ``configs`` name (``class_path`` values and
    flag values), so that jsonargparse resolves their short names; all families when a name is unknown."""
    names = set(_flag_values(args))
    for config in configs:
        names.update(_class_paths(config))
    modules = set()
    unknown = False
    for name in names:
        if name in CLASS_MODULES:
            modules.add(CLASS_MODULES[name])
        elif name.startswith("zoo."):
            modules.add(".".join(name.split(".")[:2]))
        elif name.isidentifier() and name[:1].isupper() and not _external(name):
            unknown = True
    for module in sorted(modules | (set(FAMILIES) if unknown else set())):
        importlib.import_module(module)


def import_class(name: str) -> type:
    """A class by dotted path (``zoo.vision.ImageClassifier``) or by the short name configs use."""
    if "." not in name:
        if name not in CLASS_MODULES:
            from zoo.errors import ZooError

            raise ZooError(f"unknown class {name!r}: give its dotted path, e.g. zoo.vision.ImageClassifier")
        name = f"{CLASS_MODULES[name]}.{name}"
    module, _, attribute = name.rpartition(".")
    return getattr(importlib.import_module(module), attribute)


def _flag_values(args: Sequence[str]) -> Iterable[str]:
    for arg in args:
        value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
        if not value.startswith("-"):
            yield value


def _class_paths(config: str) -> Iterable[str]:
    path = Path(config)
    if not path.is_file():
        return
    import yaml

    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return  # jsonargparse reports the file with its own message
    stack = [content]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("class_path"), str):
                yield node["class_path"]
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _external(name: str) -> bool:
    return any(hasattr(importlib.import_module(module), name) for module in _EXTERNAL_MODULES)


def config_path(relative: str) -> Path:
    """Absolute path of a config shipped in ``zoo.configs`` (works from a clone and from a wheel)."""
    path = Path(str(resources.files("zoo.configs").joinpath(relative)))
    if not path.is_file():
        raise FileNotFoundError(f"config {relative!r} is not in {path.parent}")
    return path


def resolve_config(value: str) -> str:
    """A ``--config`` value as a path: an existing file as given; else a registered model name
    (``deit_tiny``) or a path inside the shipped configs (``vision/deit_tiny``, ``strategy/ddp.yaml``)."""
    if Path(value).exists() or "\n" in value or ":" in value.split("/")[0]:
        return value  # a file, or a YAML string given inline
    by_name = {m.name: m.config for m in MODELS}
    relative = by_name.get(value, value if value.endswith((".yaml", ".yml")) else f"{value}.yaml")
    try:
        return str(config_path(relative))
    except FileNotFoundError:
        return value  # jsonargparse reports the missing file


def list_models() -> list[ModelEntry]:
    """Every registered model, with its stored parameter count (instant: nothing is built)."""
    return list(MODELS)


@functools.cache
def measure_parameters(relative_config: str) -> int:
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


def main(argv: Sequence[str] | None = None) -> None:
    """``zoo list``: the model table."""
    import argparse

    parser = argparse.ArgumentParser(prog="zoo list", description="The registered models and their configs.")
    parser.add_argument("--task", help="only models of this task (e.g. image-classification)")
    args = parser.parse_args(argv)
    rows = [m for m in MODELS if args.task in (None, m.task)]
    width = max(len(m.name) for m in rows) if rows else 4
    task_width = max(len(m.task) for m in rows) if rows else 4
    print(f"{'name':<{width}}  {'task':<{task_width}}  {'params':>9}  config")
    for m in rows:
        print(f"{m.name:<{width}}  {m.task:<{task_width}}  {m.parameters / 1e6:>8.2f}M  {m.config}")
