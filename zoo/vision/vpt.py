"""``VisualPromptTuning``: train prompts and a head on a frozen ViT/Swin, save just those.

The backbone comes from a zoo ``ImageClassifier`` checkpoint (``backbone_checkpoint``), from a
local timm weights file (``backbone_weights``), or, for smoke tests only, from a randomly
initialised timm model. When it came from a file, checkpoints hold only the prompts and the
head (VPT's point: a few kB per task) and the backbone is re-read from that file on load.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from zoo.base import ZooModule
from zoo.layers import ConvStemPatchEmbed
from zoo.optim import WarmupCosineLR
from zoo.vision.prompted import prompted_backbone

__all__ = ["VisualPromptTuning", "load_classifier_backbone"]

_BACKBONE_PREFIX = "network.backbone."


def load_classifier_backbone(checkpoint_path: str | Path) -> nn.Module:
    """The timm network inside an ``ImageClassifier`` checkpoint, rebuilt from its hyper-parameters."""
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone checkpoint {str(path)!r} does not exist")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    hparams = checkpoint.get("hyper_parameters", {})
    if "model_name" not in hparams or "state_dict" not in checkpoint:
        raise ValueError(f"{str(path)!r} is not an ImageClassifier checkpoint (no model_name / state_dict)")
    kwargs = dict(hparams.get("model_kwargs") or {})
    if hparams.get("patch_size") is not None:
        kwargs["patch_size"] = hparams["patch_size"]
    if hparams.get("stem") == "conv":
        kwargs["embed_layer"] = ConvStemPatchEmbed
    network = timm.create_model(
        hparams["model_name"],
        pretrained=False,
        num_classes=hparams["num_classes"],
        img_size=hparams["img_size"],
        in_chans=hparams.get("in_chans", 3),
        **kwargs,
    )
    weights = {
        k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")
    }
    network.load_state_dict(weights)
    return network


class VisualPromptTuning(ZooModule):
    """VPT on a frozen timm ViT or Swin backbone.

    Args:
        backbone: timm model name (architecture to build when no checkpoint is given).
        backbone_checkpoint: a zoo ``ImageClassifier`` ``.ckpt``; its architecture wins over ``backbone``.
        backbone_weights: a local timm weights file (``.safetensors`` / ``.pth``) for ``backbone``.
        num_classes / img_size: of the new task; the CLI links them from the data module.
        patch_size / backbone_kwargs: architecture overrides when building ``backbone`` by name.
        num_prompts: prompt tokens per layer (VPT searches 1-200).
        deep: prompts at every layer (VPT-deep) instead of the input only (VPT-shallow).
        prompt_dropout: dropout on the prompt tokens only.
    """

    def __init__(
        self,
        backbone: str = "vit_tiny_patch16_224",
        backbone_checkpoint: str | None = None,
        backbone_weights: str | None = None,
        num_classes: int = 12,
        img_size: int = 32,
        patch_size: int | None = None,
        backbone_kwargs: dict | None = None,
        num_prompts: int = 10,
        deep: bool = False,
        prompt_dropout: float = 0.0,
        label_smoothing: float = 0.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.num_classes = num_classes
        self.backbone_from_file = backbone_checkpoint is not None or backbone_weights is not None
        self.network = prompted_backbone(
            self._build_backbone(), num_classes, num_prompts, deep, prompt_dropout
        )
        self.setup_metrics()

    def _build_backbone(self) -> nn.Module:
        hp = self.hparams
        if hp.backbone_checkpoint is not None:
            return load_classifier_backbone(hp.backbone_checkpoint)
        kwargs = dict(hp.backbone_kwargs or {})
        if hp.patch_size is not None:
            kwargs["patch_size"] = hp.patch_size
        if hp.backbone_weights is not None:
            if not Path(hp.backbone_weights).is_file():
                raise FileNotFoundError(f"backbone weights {hp.backbone_weights!r} do not exist")
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": hp.backbone_weights})
        else:
            rank_zero_warn(
                "VPT backbone is randomly initialised: prompts on it are a smoke test, not a result."
            )
        return timm.create_model(hp.backbone, img_size=hp.img_size, **kwargs)

    def configure_metrics(self) -> MetricCollection:
        return MetricCollection({"acc": MulticlassAccuracy(self.num_classes, top_k=1, average="micro")})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)

    @property
    def trainable_fraction(self) -> float:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable / sum(p.numel() for p in self.parameters())

    def on_fit_start(self) -> None:
        super().on_fit_start()
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        rank_zero_info(
            f"VPT trains {trainable:,} parameters ({100 * self.trainable_fraction:.2f}% of the model)"
        )

    def on_train_epoch_start(self) -> None:
        self.log("vpt/trainable_fraction", self.trainable_fraction, rank_zero_only=True)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self(batch["image"])
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.update_metrics("train", logits.detach(), batch["label"])
        return loss

    def _evaluate(self, batch: dict, stage: str) -> torch.Tensor:
        logits = self(batch["image"])
        loss = F.cross_entropy(logits, batch["label"])
        self.log(f"{stage}/loss", loss, sync_dist=True)
        self.update_metrics(stage, logits, batch["label"])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        probabilities = self(batch["image"]).softmax(dim=-1)
        return {"probabilities": probabilities, "prediction": probabilities.argmax(dim=-1)}

    # ------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only prompts and head when the frozen backbone can be re-read from its file."""
        if not self.backbone_from_file:
            return
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(_BACKBONE_PREFIX) and "prompts" not in k]:
            del state[key]
        checkpoint["vpt_backbone_omitted"] = True

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if checkpoint.get("vpt_backbone_omitted"):
            state = checkpoint["state_dict"]
            for key, value in self.state_dict().items():
                if key.startswith(_BACKBONE_PREFIX) and key not in state:
                    state[key] = value
        super().on_load_checkpoint(checkpoint)
