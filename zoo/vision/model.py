"""The vision family's networks as plain ``nn.Module`` builders, usable without Lightning.

Every network is a timm model (random weights, nothing downloaded), so timm's interface
(``forward_features``, ``forward_head``, ``group_matcher``, ``no_weight_decay``...) and its helpers
keep working on it. What the zoo adds at build time is the convolutional stem option and the two
ways of getting a frozen backbone for prompt tuning: from a zoo ``ImageClassifier`` checkpoint or
from a local timm weights file, and fine-tuning a classifier from a local timm weights file
(``load_timm_weights``). The prompt wrappers themselves are in ``zoo.vision.prompted``.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from zoo.errors import MissingFileError, ZooError
from zoo.layers import ConvStemPatchEmbed

__all__ = [
    "STEMS",
    "load_classifier_backbone",
    "load_timm_weights",
    "timm_backbone",
    "timm_block_types",
    "timm_classifier",
]

#: Patch-embedding choices: timm's single strided convolution, or a stack of 3x3 stride-2 convolutions.
STEMS = ("patch", "conv")


def timm_block_types(model: nn.Module) -> tuple[type[nn.Module], ...]:
    """The repeated transformer block types of a timm ViT/Swin: the units FSDP shards one at a time."""
    from timm.models.swin_transformer import SwinTransformerBlock
    from timm.models.vision_transformer import Block

    return tuple({type(m) for m in model.modules() if isinstance(m, (Block, SwinTransformerBlock))})


def _create(model_name: str, img_size: int, **kwargs) -> nn.Module:
    """A timm model, with random weights unless ``pretrained``; ``img_size`` only reaches architectures that
    take it.

    Transformers fix their position embeddings to ``img_size``; convolutional networks (ResNet,
    ConvNeXt, EfficientNet...) take any size and reject the argument, so it is left out for them.
    """
    kwargs.setdefault("pretrained", False)
    try:
        return timm.create_model(model_name, img_size=img_size, **kwargs)
    except TypeError as error:
        if "img_size" not in str(error):
            raise
        return timm.create_model(model_name, **kwargs)


def timm_classifier(
    model_name: str,
    num_classes: int,
    img_size: int,
    patch_size: int | None = None,
    stem: str = "patch",
    in_chans: int = 3,
    model_kwargs: dict | None = None,
    drop_path_rate: float = 0.0,
    pretrained_file: str | None = None,
) -> nn.Module:
    """The timm network of an ``ImageClassifier`` (see its arguments), with random weights, or those of a
    local timm weights file (``load_timm_weights``).

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
    if pretrained_file is not None:
        return load_timm_weights(
            model_name,
            pretrained_file,
            num_classes,
            img_size=img_size,
            in_chans=in_chans,
            drop_path_rate=drop_path_rate,
            **kwargs,
        )
    return _create(
        model_name,
        img_size=img_size,
        num_classes=num_classes,
        in_chans=in_chans,
        drop_path_rate=drop_path_rate,
        **kwargs,
    )


def _classifier_names(model_name: str) -> tuple[str, ...]:
    """The classifier layers timm names for the architecture (``head``; ``head``, ``head_dist``; ``head.fc``)."""
    names = timm.get_pretrained_cfg_value(model_name, "classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def _file_classes(path: Path, classifier: str) -> int:
    """Rows of the file's classifier weight (0 for a headless file), read with timm's reader; a safetensors
    file gives the shape without loading the tensors."""
    from timm.models import load_state_dict

    key = f"{classifier}.weight"
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as weights:
            names = set(weights.keys())  # safe_open has no __contains__
            return weights.get_slice(key).get_shape()[0] if key in names else 0
    weights = load_state_dict(str(path))
    return weights[key].shape[0] if key in weights else 0


def load_timm_weights(model_name: str, weights_file: str | Path, num_classes: int | None, img_size: int,
                      argument: str = "pretrained_file", **kwargs) -> nn.Module:  # fmt: skip
    """A timm network built as ``timm_classifier`` builds it, with the weights of a local timm file
    (``.safetensors``, ``.pth``, ``.bin``: a timm state dict, or the ``model.safetensors`` of a timm
    Hugging Face folder, e.g. one ``zoo export --format timm`` wrote). Nothing is downloaded.

    The file is read by timm (``pretrained_cfg_overlay=dict(file=...)``), so timm's checkpoint filter of the
    architecture applies: position embeddings are resampled to this ``img_size``'s token grid and a patch
    embedding to another ``patch_size`` (ViT/DeiT), relative-position tables to another window (Swin). The
    network is first built with the file's class count, so every tensor of the file must fit (a mismatch is
    an error, not a silently random layer); for another ``num_classes`` the classifier is then dropped and
    freshly initialised as timm does when fine-tuning, and everything else copied over. ``num_classes=None``
    keeps the file's classifier; ``argument`` is the name errors give the file.
    """
    path = Path(weights_file)
    if not path.is_file():
        raise MissingFileError(f"{argument} {str(path)!r} does not exist")
    described = f"{model_name} (img_size={img_size}, {', '.join(f'{k}={v}' for k, v in kwargs.items())})"
    classifiers = _classifier_names(model_name)
    try:
        source_classes = _file_classes(path, classifiers[0]) if classifiers else (num_classes or 1000)
        overlay = {"file": str(path), "num_classes": source_classes}
        source = _create(model_name, img_size, pretrained=True, pretrained_cfg_overlay=overlay,
                         num_classes=source_classes, **kwargs)  # fmt: skip
    except (RuntimeError, KeyError, ValueError, OSError, AttributeError) as error:
        # PyTorch's first line only says "Error(s) in loading state_dict": the next one names the keys
        reason = (
            " ".join(line.strip() for line in str(error).strip().splitlines()[:2]) or type(error).__name__
        )
        reason = reason if len(reason) < 500 else reason[:500] + "..."
        raise ZooError(f"{argument} {str(path)!r} does not fit {described}: {reason}") from error
    if num_classes is None or source_classes == num_classes:
        return source
    target = _create(model_name, img_size, pretrained=False, num_classes=num_classes, **kwargs)

    def in_classifier(key: str) -> bool:
        return any(key.startswith(f"{name}.") for name in classifiers)

    kept = {k: v for k, v in source.state_dict().items() if not in_classifier(k)}
    result = target.load_state_dict(kept, strict=False)
    if result.unexpected_keys or not all(in_classifier(k) for k in result.missing_keys):
        raise ZooError(f"{argument} {str(path)!r}: {result} when replacing the classifier of {described}")
    return target


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
    """A timm ViT/Swin by name, with the weights of a local timm file (``.safetensors`` / ``.pth``) if given,
    read by ``load_timm_weights`` (so a file with any classifier fits: VPT replaces the head anyway).

    Without ``weights_file`` the weights are random, which only suits smoke tests of prompt tuning.
    """
    kwargs = dict(model_kwargs or {})
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    if weights_file is not None:
        return load_timm_weights(
            model_name, weights_file, None, img_size, argument="backbone_weights", **kwargs
        )
    return timm.create_model(model_name, img_size=img_size, **kwargs)
