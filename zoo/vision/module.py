"""The vision family's LightningModules: ``ImageClassifier`` and ``VisualPromptTuning``.

Both classify images into the data module's classes and share, through ``ImageClassificationModule``,
their metrics (``<stage>/acc``, and ``<stage>/acc_top5`` above 5 classes), losses, evaluation and
prediction. Batches are ``{"image": (B, C, H, W), "label": (B,)}``; predict batches may carry
``"id"`` instead of labels.

``predict_step`` returns one record per image::

    {"id": "cats/001.jpg",           # the batch's "id" (file path, dataset index), else "<batch>:<position>"
     "label": "cat",                 # predicted class name (its index as a string when names are unknown)
     "class_index": 3,
     "top_k": [{"class": "cat", "probability": 0.91}, ...]}   # the min(5, num_classes) most likely

Class names come from the data module (``class_names``, linked by the CLI); checkpoints written before
the argument existed predict indices.

``zoo export`` writes the network as one graph, ``classifier`` (``image`` -> ``logits``), and an
``ImageClassifier`` also as a timm folder (``--format timm``); ``zoo.vision.export`` says how.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from zoo.base import ZooModule, rename_keys
from zoo.optim import WarmupCosineLR, layer_decay_groups
from zoo.vision.model import load_classifier_backbone, timm_backbone, timm_block_types, timm_classifier
from zoo.vision.prompted import prompted_backbone

__all__ = ["ImageClassificationModule", "ImageClassifier", "VisualPromptTuning"]

#: Most likely classes listed in each prediction record.
TOP_K = 5


class ImageClassificationModule(ZooModule):
    """What every image classifier of the family shares: losses, metrics, steps and predict records.

    A subclass takes ``num_classes``, ``img_size``, ``class_names`` and ``label_smoothing`` among its
    arguments and builds ``self.model``, mapping ``(B, C, img_size, img_size)`` images to class logits.
    """

    @staticmethod
    def check_classes(num_classes: int, class_names: list[str] | None) -> None:
        """Fail before anything is built when the class arguments cannot describe a classifier."""
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for num_classes={num_classes}")

    @property
    def num_classes(self) -> int:
        return self.hparams.num_classes

    # ------------------------------------------------------------------ hooks
    def configure_losses(self) -> None:
        self.criterion = nn.CrossEntropyLoss(label_smoothing=self.hparams.label_smoothing)
        self.eval_criterion = nn.CrossEntropyLoss()  # evaluation losses stay comparable across recipes

    def configure_metrics(self) -> MetricCollection:
        metrics = {"acc": MulticlassAccuracy(self.num_classes, top_k=1, average="micro")}
        if self.num_classes > TOP_K:
            metrics["acc_top5"] = MulticlassAccuracy(self.num_classes, top_k=TOP_K, average="micro")
        return MetricCollection(metrics)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def example_inputs(self, batch_size: int = 2) -> tuple[torch.Tensor]:
        side = self.hparams.img_size
        # prompt-tuned backbones are RGB timm models, which take no in_chans argument here
        channels = self.hparams.get("in_chans", 3)
        return (torch.randn(batch_size, channels, side, side, device=self.device),)

    def export_graphs(self) -> list:
        """One graph, ``classifier``: ``image`` (dynamic batch, fixed ``img_size``) -> ``logits``, the network
        ``forward`` calls (for a distilled DeiT in eval mode, the mean of both heads, as ``predict_step``).
        int8 layers are exported as ``zoo.vision.export.TorchaoInt8Linear`` (``DynamicInt8Linear`` for
        checkpoints quantized with ``torch.ao``)."""
        from zoo.vision.export import classifier_graph

        return [classifier_graph(self.model, self.example_inputs)]

    # ------------------------------------------------------------------ steps
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes is not None and data_classes != self.num_classes:
            raise ValueError(
                f"the model has num_classes={self.num_classes} but the data module has {data_classes} classes"
            )

    def log_loss(self, stage: str, loss: torch.Tensor, batch_size: int) -> None:
        self.log(f"{stage}/loss", loss, prog_bar=stage != "test", sync_dist=True, batch_size=batch_size)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self(batch["image"]).float()  # bf16 under autocast: loss and metrics in float32
        loss = self.criterion(logits, batch["label"])
        self.log_loss("train", loss, len(logits))
        self.update_metrics("train", logits.detach(), batch["label"])
        return loss

    def evaluate(self, batch: dict, stage: str) -> torch.Tensor:
        logits = self(batch["image"]).float()
        loss = self.eval_criterion(logits, batch["label"])
        self.log_loss(stage, loss, len(logits))
        self.update_metrics(stage, logits, batch["label"])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.evaluate(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.evaluate(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict[str, Any]]:
        """One record per image: ``{"id", "label", "class_index", "top_k"}`` (module docstring)."""
        probabilities = self(batch["image"]).float().softmax(dim=-1)
        top = probabilities.topk(min(TOP_K, probabilities.shape[-1]), dim=-1)
        ids = batch.get("id") or [f"{batch_idx}:{i}" for i in range(len(probabilities))]
        names = self.hparams.class_names or [str(i) for i in range(probabilities.shape[-1])]
        records = []
        for item_id, values, indices in zip(ids, top.values.tolist(), top.indices.tolist(), strict=True):
            records.append(
                {
                    "id": str(item_id),
                    "label": names[indices[0]],
                    "class_index": indices[0],
                    "top_k": [{"class": names[i], "probability": p} for i, p in zip(indices, values)],
                }
            )
        return records


class ImageClassifier(ImageClassificationModule):
    """Image classification with a timm backbone, built from plain arguments so YAML can configure it.

    ``self.model`` *is* the timm network, so its outputs equal timm's for the same weights. What timm
    leaves to its training script (mixup/cutmix, label smoothing, layer-wise LR decay that works with
    any scheduler, metrics) lives here.

    Args:
        model_name: any timm model name (``vit_*``, ``deit_*``, ``deit_*_distilled_*``, ``swin_*``, or a
            convolutional network such as ``resnet18``); weights are random (nothing is downloaded).
        num_classes: output classes; the CLI links it from the data module.
        img_size: input side; the CLI links it from the data module.
        class_names: names of the classes, for predictions; the CLI links them from the data module.
        patch_size: overrides the model's patch size (e.g. 4 for 32 px images).
        stem: ``"patch"`` (timm's single strided convolution) or ``"conv"`` (a stack of 3x3
            stride-2 convolutions, ``zoo.layers.ConvStemPatchEmbed``; ViT/DeiT only), which
            trains much faster from scratch on small data.
        in_chans: input channels.
        model_kwargs: further keyword arguments for ``timm.create_model`` (``window_size``,
            ``depths``, ``embed_dim``...).
        drop_path_rate: stochastic depth rate (linear over depth, timm's rule).
        label_smoothing: for the hard-label loss; with mixup it goes into the soft targets.
        mixup_alpha / cutmix_alpha: timm's ``Mixup``; 0 disables. Applied to even-sized batches.
        layer_decay: layer-wise LR decay factor (e.g. 0.75), applied through the optimizer's
            groups so that any scheduler honours it.
        pretrained_file: a local timm weights file to start from (``.safetensors``, ``.pth``, ``.bin``, or
            the ``model.safetensors`` of a timm Hugging Face folder); position embeddings are resized to
            ``img_size`` and a classifier of another class count is re-initialised, as timm does
            (``zoo.vision.model.load_timm_weights``). Read when the model is built for a fresh fit only:
            checkpoints hold the weights, so their hyper-parameters drop the file (a served or resumed
            model does not need it).
        compile: ``torch.compile`` the network (``self.model``) when a trainer sets the module up: ``true``, or a
            dict of ``torch.compile`` options (``mode``, ``fullgraph``, ``dynamic``, ``backend``, ``options``);
            checkpoints are the same as without it (``ZooModule.compile_network``).
    """

    def __init__(
        self,
        model_name: str = "deit_tiny_patch16_224",
        num_classes: int = 12,
        img_size: int = 32,
        class_names: list[str] | None = None,
        patch_size: int | None = None,
        stem: str = "patch",
        in_chans: int = 3,
        model_kwargs: dict | None = None,
        drop_path_rate: float = 0.0,
        label_smoothing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        layer_decay: float | None = None,
        pretrained_file: str | None = None,
        compile: bool | dict = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
    ) -> None:
        self.check_classes(num_classes, class_names)
        super().__init__(optimizer, lr_scheduler)

    def configure_models(self) -> None:
        hp = self.hparams
        self.model = timm_classifier(
            hp.model_name,
            num_classes=hp.num_classes,
            img_size=hp.img_size,
            patch_size=hp.patch_size,
            stem=hp.stem,
            in_chans=hp.in_chans,
            model_kwargs=hp.model_kwargs,
            drop_path_rate=hp.drop_path_rate,
            pretrained_file=hp.get("pretrained_file"),
        )
        self.sharding_units = timm_block_types(self.model)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The weights are in the checkpoint, so loading it must not need the starting weights file again."""
        super().on_save_checkpoint(checkpoint)
        hparams = checkpoint.get("hyper_parameters")
        if hparams and hparams.get("pretrained_file") is not None:
            checkpoint["hyper_parameters"] = {**hparams, "pretrained_file": None}

    def library_exports(self) -> dict:
        """``--format timm``: the timm network as ``model.safetensors`` + ``config.json`` (timm's Hugging Face
        layout; ``zoo.vision.export.write_timm_folder``)."""
        from zoo.vision.export import write_timm_folder

        return {"timm": lambda folder: write_timm_folder(self.model, folder, self.hparams.class_names)}

    def configure_losses(self) -> None:
        super().configure_losses()
        hp = self.hparams
        self.mixup = None
        if hp.mixup_alpha > 0 or hp.cutmix_alpha > 0:
            from timm.data import Mixup
            from timm.loss import SoftTargetCrossEntropy

            self.mixup = Mixup(
                mixup_alpha=hp.mixup_alpha,
                cutmix_alpha=hp.cutmix_alpha,
                label_smoothing=hp.label_smoothing,
                num_classes=hp.num_classes,
            )
            self.soft_criterion = SoftTargetCrossEntropy()

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

    def _mixes(self, labels: torch.Tensor) -> bool:
        """Mixup pairs each image with another of the batch, so it needs an even batch."""
        return self.mixup is not None and len(labels) % 2 == 0

    def distillation_targets(
        self, batch: dict
    ) -> tuple[torch.Tensor | tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``(student_logits, labels)`` for ``zoo.callbacks.Distillation`` (the interface in ``callbacks``).

        Mixup/CutMix is applied here and written back into ``batch["image"]``, so the teacher sees the same
        mixed images (DeiT's recipe); ``labels`` are then soft targets. A distilled DeiT returns
        ``(class_logits, distillation_logits)``; any other model its logits.
        """
        images, labels = batch["image"], batch["label"]
        if self._mixes(labels):
            images, labels = self.mixup(images, labels)
            batch["image"] = images
        logits = self.forward_heads(images) if self.is_distilled else self(images)
        return logits, labels

    def parameter_groups(self) -> list[dict]:
        if self.hparams.layer_decay is None:
            return super().parameter_groups()
        return layer_decay_groups(self.model, self.hparams.layer_decay)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Soft targets from mixup/cutmix on even batches (no training accuracy then), else hard labels."""
        if not self._mixes(batch["label"]):
            return super().training_step(batch, batch_idx)
        images, soft_targets = self.mixup(batch["image"], batch["label"])
        loss = self.soft_criterion(self(images).float(), soft_targets)  # its log-softmax in float32
        self.log_loss("train", loss, len(images))
        return loss


class VisualPromptTuning(ImageClassificationModule):
    """VPT (Jia et al., 2022) on a frozen timm ViT or Swin: train prompts and a head, save just those.

    The backbone comes from a zoo ``ImageClassifier`` checkpoint (``backbone_checkpoint``), from a local
    timm weights file (``backbone_weights``), or, for smoke tests only, from a randomly initialised timm
    model. When it came from a file, checkpoints hold only the prompts and the head (VPT's point: a few
    kB per task) and the backbone is re-read from that file on load.

    Args:
        model_name: timm model name (architecture to build when no checkpoint is given).
        backbone_checkpoint: a zoo ``ImageClassifier`` ``.ckpt``; its architecture wins over ``model_name``.
        backbone_weights: a local timm weights file (``.safetensors`` / ``.pth``) for ``model_name``.
        num_classes / img_size / class_names: of the new task; the CLI links them from the data module.
        patch_size / model_kwargs: architecture overrides when building ``model_name``.
        num_prompts: prompt tokens per layer (VPT searches 1-200).
        deep: prompts at every layer (VPT-deep) instead of the input only (VPT-shallow).
        prompt_dropout: dropout on the prompt tokens only.
        label_smoothing: for the training loss.
        compile: ``torch.compile`` the network (``self.model``) when a trainer sets the module up: ``true``, or a
            dict of ``torch.compile`` options (``mode``, ``fullgraph``, ``dynamic``, ``backend``, ``options``);
            checkpoints are the same as without it (``ZooModule.compile_network``).

    Checkpoints written before ``model_name`` / ``model_kwargs`` (``backbone`` / ``backbone_kwargs``, the
    network under ``network.``) still load.
    """

    state_dict_renames = (("network.", "model."),)
    hparams_renames = (("backbone", "model_name"), ("backbone_kwargs", "model_kwargs"))
    #: frozen backbone entries, dropped from checkpoints when the backbone file can rebuild them
    backbone_prefix: ClassVar[str] = "model.backbone."

    def __init__(
        self,
        model_name: str = "vit_tiny_patch16_224",
        backbone_checkpoint: str | None = None,
        backbone_weights: str | None = None,
        num_classes: int = 12,
        img_size: int = 32,
        class_names: list[str] | None = None,
        patch_size: int | None = None,
        model_kwargs: dict | None = None,
        num_prompts: int = 10,
        deep: bool = False,
        prompt_dropout: float = 0.0,
        label_smoothing: float = 0.0,
        compile: bool | dict = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
    ) -> None:
        self.check_classes(num_classes, class_names)
        super().__init__(optimizer, lr_scheduler)

    def configure_models(self) -> None:
        hp = self.hparams
        if hp.backbone_checkpoint is not None:
            backbone = load_classifier_backbone(hp.backbone_checkpoint)
        else:
            if hp.backbone_weights is None:
                rank_zero_warn(
                    "VPT backbone is randomly initialised: prompts on it are a smoke test, not a result."
                )
            backbone = timm_backbone(
                hp.model_name, hp.img_size, hp.patch_size, hp.model_kwargs, weights_file=hp.backbone_weights
            )
        self.model = prompted_backbone(backbone, hp.num_classes, hp.num_prompts, hp.deep, hp.prompt_dropout)
        # the frozen blocks too: without units FSDP2 would leave the module whole and its prompts unsynchronised
        self.sharding_units = timm_block_types(self.model)

    @property
    def backbone_from_file(self) -> bool:
        return self.hparams.backbone_checkpoint is not None or self.hparams.backbone_weights is not None

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

    # ------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only prompts and head when the frozen backbone can be re-read from its file."""
        super().on_save_checkpoint(checkpoint)
        if not self.backbone_from_file:
            return
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(self.backbone_prefix) and "prompts" not in k]:
            del state[key]
        checkpoint["vpt_backbone_omitted"] = True

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Upgrade old keys, put back the omitted backbone entries (rebuilt from the file), check the keys."""
        if checkpoint.get("vpt_backbone_omitted"):
            # renamed first, so that prompts inside the backbone (Swin) keep their saved values
            state = checkpoint["state_dict"] = rename_keys(checkpoint["state_dict"], self.state_dict_renames)
            for key, value in self.state_dict().items():
                if key.startswith(self.backbone_prefix) and key not in state:
                    state[key] = value
        super().on_load_checkpoint(checkpoint)
