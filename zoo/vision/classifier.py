"""``ImageClassifier``: any timm ViT / DeiT / DeiT-distilled / Swin as a LightningModule.

The network *is* the timm model (``self.model``), so timm's interface (``forward_features``,
``forward_head``, ``group_matcher``, ``no_weight_decay``...) and its helpers keep working on it,
and its outputs equal timm's for the same weights. What timm leaves to its training script
(mixup/cutmix, label smoothing, layer-wise LR decay that works with any scheduler, metrics)
lives here.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from zoo.base import ZooModule
from zoo.layers import ConvStemPatchEmbed
from zoo.optim import WarmupCosineLR, layer_decay_groups

__all__ = ["ImageClassifier"]


def _timm_block_types(model: torch.nn.Module) -> tuple[type[torch.nn.Module], ...]:
    """The repeated transformer blocks of a timm ViT/Swin, used as FSDP units."""
    from timm.models.swin_transformer import SwinTransformerBlock
    from timm.models.vision_transformer import Block

    return tuple({type(m) for m in model.modules() if isinstance(m, (Block, SwinTransformerBlock))})


def _create_timm_model(model_name: str, img_size: int, **kwargs) -> torch.nn.Module:
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


class ImageClassifier(ZooModule):
    """Image classification with a timm backbone, built from plain arguments so YAML can configure it.

    Args:
        model_name: any timm model name (``vit_*``, ``deit_*``, ``deit_*_distilled_*``, ``swin_*``, or a
            convolutional network such as ``resnet18``); weights are random (nothing is downloaded).
        num_classes: output classes; the CLI links it from the data module.
        img_size: input side; the CLI links it from the data module.
        patch_size: overrides the model's patch size (e.g. 4 for 32 px images).
        stem: ``"patch"`` (timm's single strided convolution) or ``"conv"`` (a stack of 3x3
            stride-2 convolutions, ``zoo.layers.ConvStemPatchEmbed``; ViT/DeiT only), which
            trains much faster from scratch on small data.
        model_kwargs: further keyword arguments for ``timm.create_model`` (``window_size``,
            ``depths``, ``embed_dim``...).
        drop_path_rate: stochastic depth rate (linear over depth, timm's rule).
        label_smoothing: for the hard-label loss; with mixup it goes into the soft targets.
        mixup_alpha / cutmix_alpha: timm's ``Mixup``; 0 disables. Applied to even-sized batches.
        layer_decay: layer-wise LR decay factor (e.g. 0.75), applied through the optimizer's
            groups so that any scheduler honours it.
    """

    def __init__(
        self,
        model_name: str = "deit_tiny_patch16_224",
        num_classes: int = 12,
        img_size: int = 32,
        patch_size: int | None = None,
        stem: str = "patch",
        in_chans: int = 3,
        model_kwargs: dict | None = None,
        drop_path_rate: float = 0.0,
        label_smoothing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        layer_decay: float | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        kwargs = dict(model_kwargs or {})
        if patch_size is not None:
            kwargs["patch_size"] = patch_size
        if stem == "conv":
            kwargs["embed_layer"] = ConvStemPatchEmbed
        elif stem != "patch":
            raise ValueError(f"stem must be 'patch' or 'conv', got {stem!r}")
        self.model = _create_timm_model(
            model_name,
            img_size=img_size,
            num_classes=num_classes,
            in_chans=in_chans,
            drop_path_rate=drop_path_rate,
            **kwargs,
        )
        self.num_classes = num_classes
        self.sharding_units = _timm_block_types(self.model)
        self.mixup = self._build_mixup(mixup_alpha, cutmix_alpha, label_smoothing, num_classes)
        self.setup_metrics()

    @staticmethod
    def _build_mixup(mixup_alpha: float, cutmix_alpha: float, smoothing: float, num_classes: int):
        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            return None
        from timm.data import Mixup

        return Mixup(
            mixup_alpha=mixup_alpha,
            cutmix_alpha=cutmix_alpha,
            label_smoothing=smoothing,
            num_classes=num_classes,
        )

    def configure_metrics(self) -> MetricCollection:
        metrics = {"acc": MulticlassAccuracy(self.num_classes, top_k=1, average="micro")}
        if self.num_classes > 5:
            metrics["acc_top5"] = MulticlassAccuracy(self.num_classes, top_k=5, average="micro")
        return MetricCollection(metrics)

    # ------------------------------------------------------------- timm model
    @property
    def is_distilled(self) -> bool:
        """True for DeiT with a distillation token (class and distillation heads)."""
        return hasattr(self.model, "head_dist")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits; for distilled DeiT the mean of both heads, as DeiT evaluates."""
        return self.model(images)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(images)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.model.forward_head(features, pre_logits=pre_logits)

    def forward_heads(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(class_logits, distillation_logits)`` of a distilled DeiT, in train and eval mode alike."""
        if not self.is_distilled:
            raise TypeError(
                f"{self.hparams.model_name!r} has no distillation token; use a deit_*_distilled_* model"
            )
        tokens = self.model.forward_features(images)
        return self.model.head(tokens[:, 0]), self.model.head_dist(tokens[:, 1])

    def distillation_targets(
        self, batch: dict
    ) -> tuple[torch.Tensor | tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``(student_logits, labels)`` for ``zoo.callbacks.Distillation`` (the interface in ``callbacks``).

        Mixup/CutMix is applied here and written back into ``batch["image"]``, so the teacher sees the same
        mixed images (DeiT's recipe); ``labels`` are then soft targets. A distilled DeiT returns
        ``(class_logits, distillation_logits)``; any other model its logits.
        """
        images, labels = batch["image"], batch["label"]
        if self.mixup is not None and len(labels) % 2 == 0:
            images, labels = self.mixup(images, labels)
            batch["image"] = images
        logits = self.forward_heads(images) if self.is_distilled else self(images)
        return logits, labels

    def parameter_groups(self) -> list[dict]:
        if self.hparams.layer_decay is None:
            return super().parameter_groups()
        return layer_decay_groups(self.model, self.hparams.layer_decay)

    # ---------------------------------------------------------------- steps
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes is not None and data_classes != self.num_classes:
            raise ValueError(
                f"the model has num_classes={self.num_classes} but the data module has {data_classes} classes"
            )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images, labels = batch["image"], batch["label"]
        if self.mixup is not None and len(labels) % 2 == 0:
            images, soft_targets = self.mixup(images, labels)
            loss = torch.sum(-soft_targets * F.log_softmax(self(images), dim=-1), dim=-1).mean()
        else:
            logits = self(images)
            loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
            self.update_metrics("train", logits.detach(), labels)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(labels))
        return loss

    def _evaluate(self, batch: dict, stage: str) -> torch.Tensor:
        logits = self(batch["image"])
        loss = F.cross_entropy(logits, batch["label"])
        self.log(
            f"{stage}/loss", loss, prog_bar=stage == "val", sync_dist=True, batch_size=len(batch["label"])
        )
        self.update_metrics(stage, logits, batch["label"])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        probabilities = self(batch["image"]).softmax(dim=-1)
        return {"probabilities": probabilities, "prediction": probabilities.argmax(dim=-1)}
