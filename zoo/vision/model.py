"""The vision family's networks as plain ``nn.Module`` builders, usable without Lightning.

Every network is a timm model (random weights, nothing downloaded), so timm's interface
(``forward_features``, ``forward_head``, ``group_matcher``, ``no_weight_decay``...) and its helpers
keep working on it. What the zoo adds at build time is the convolutional stem option and the two
ways of getting a frozen backbone for prompt tuning: from a zoo ``ImageClassifier`` checkpoint or
from a local timm weights file. The prompt wrappers themselves are in ``zoo.vision.prompted``.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from zoo.layers import ConvStemPatchEmbed

__all__ = ["STEMS", "load_classifier_backbone", "timm_backbone", "timm_block_types", "timm_classifier"]

#: Patch-embedding choices: timm's single strided convolution, or a stack of 3x3 stride-2 convolutions.
STEMS = ("patch", "conv")


def timm_block_types(model: nn.Module) -> tuple[type[nn.Module], ...]:
    """The repeated transformer block types of a timm ViT/Swin: the units FSDP shards one at a time."""
    from timm.models.swin_transformer import SwinTransformerBlock
    from timm.models.vision_transformer import Block

    return tuple({type(m) for m in model.modules() if isinstance(m, (Block, SwinTransformerBlock))})


def _create(model_name: str, img_size: int, **kwargs) -> nn.Module:
    """A timm model with random weights; ``img_size`` only reaches architectures that take it.

    Transformers fix their position embeddings to ``img_size``; convolutional networks (ResNet,
    ConvNeXt, EfficientNet...) take any size and reject the argument, so it is left out for them.
    """
    try:
        return timm.create_model(model_name, pretrained=False, img_size=img_size, **kwargs)
    except TypeError as error:
        if "img_size" not in str(error):
            raise
        return timm.create_model(model_name, pretrained=False, **kwargs)


def timm_classifier(
    model_name: str,
    num_classes: int,
    img_size: int,
    patch_size: int | None = None,
    stem: str = "patch",
    in_chans: int = 3,
    model_kwargs: dict | None = None,
    drop_path_rate: float = 0.0,
) -> nn.Module:
    """The timm network of an ``ImageClassifier`` (see its arguments), with random weights.

    ``stem="conv"`` swaps timm's patchify convolution for ``zoo.layers.ConvStemPatchEmbed`` (ViT/DeiT
    only): the same token grid, but it trains much faster from scratch on small data.
    """
    if stem not in STEMS:
        raise ValueError(f"stem must be 'patch' or 'conv', got {stem!r}")
    kwargs = dict(model_kwargs or {})
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    if stem == "conv":
        kwargs["embed_layer"] = ConvStemPatchEmbed
    return _create(
        model_name,
        img_size=img_size,
        num_classes=num_classes,
        in_chans=in_chans,
        drop_path_rate=drop_path_rate,
        **kwargs,
    )


def load_classifier_backbone(checkpoint_path: str | Path) -> nn.Module:
    """The timm network inside an ``ImageClassifier`` checkpoint, rebuilt from its hyper-parameters."""
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone checkpoint {str(path)!r} does not exist")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    hparams = checkpoint.get("hyper_parameters", {})
    if "model_name" not in hparams or "state_dict" not in checkpoint:
        raise ValueError(f"{str(path)!r} is not an ImageClassifier checkpoint (no model_name / state_dict)")
    network = timm_classifier(
        hparams["model_name"],
        num_classes=hparams["num_classes"],
        img_size=hparams["img_size"],
        patch_size=hparams.get("patch_size"),
        stem=hparams.get("stem", "patch"),
        in_chans=hparams.get("in_chans", 3),
        model_kwargs=hparams.get("model_kwargs"),
    )
    weights = {
        k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")
    }
    network.load_state_dict(weights)
    return network


def timm_backbone(
    model_name: str,
    img_size: int,
    patch_size: int | None = None,
    model_kwargs: dict | None = None,
    weights_file: str | None = None,
) -> nn.Module:
    """A timm ViT/Swin by name, with the weights of a local timm file (``.safetensors`` / ``.pth``) if given.

    Without ``weights_file`` the weights are random, which only suits smoke tests of prompt tuning.
    """
    kwargs = dict(model_kwargs or {})
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    if weights_file is not None:
        if not Path(weights_file).is_file():
            raise FileNotFoundError(f"backbone weights {weights_file!r} do not exist")
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": weights_file})
    return timm.create_model(model_name, img_size=img_size, **kwargs)
