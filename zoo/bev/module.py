"""``BEVFormerDetector``: BEVFormer as a LightningModule, scored with the nuScenes detection metrics."""

from __future__ import annotations

from dataclasses import replace

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from zoo.base import ZooModule
from zoo.bev.decoder import DetectionDecoderLayer
from zoo.bev.encoder import BEVEncoderLayer
from zoo.bev.metrics import NuScenesDetectionMetric
from zoo.bev.model import BEVFORMER_CONFIGS, NUSCENES_CLASSES, BEVFormer
from zoo.optim import WarmupCosineLR, weight_decay_groups

__all__ = ["BEVFormerDetector"]


class BEVFormerDetector(ZooModule):
    """Multi-camera 3D detection with BEVFormer.

    Args:
        variant: a key of ``zoo.bev.BEVFORMER_CONFIGS`` (``bevformer_tiny``/``small``/``base`` as published,
            ``bevformer_cpu`` for the synthetic scenes).
        config: overrides of the variant's ``BEVFormerConfig`` fields (``bev_h``, ``backbone``...).
        class_names: detection classes, linked from the data module; their number sets the head.
        point_cloud_range: BEV range in metres, linked from the data module.
        temporal: use the data's history frames (temporal self-attention over the previous BEV); False
            detects from the key frame alone (the attention then sees only the current BEV).
        backbone_lr_scale: learning-rate factor of the image backbone (BEVFormer: 0.1 with pretrained weights).
        max_detections / score_threshold: decoding (top-k over query x class scores, then the threshold).
        class_ranges: per class evaluation radius (metres) of the metric; default nuScenes'.
    """

    sharding_units = (BEVEncoderLayer, DetectionDecoderLayer)

    def __init__(
        self,
        variant: str = "bevformer_cpu",
        config: dict | None = None,
        class_names: list[str] | None = None,
        point_cloud_range: list[float] | None = None,
        temporal: bool = True,
        backbone_lr_scale: float = 1.0,
        max_detections: int = 100,
        score_threshold: float = 0.0,
        class_ranges: dict[str, float] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if variant not in BEVFORMER_CONFIGS:
            raise ValueError(f"variant {variant!r} is not one of {sorted(BEVFORMER_CONFIGS)}")
        overrides = dict(config or {})
        self.class_names = list(class_names or NUSCENES_CLASSES[: BEVFORMER_CONFIGS[variant].num_classes])
        overrides["num_classes"] = len(self.class_names)
        if point_cloud_range is not None:
            overrides["point_cloud_range"] = tuple(float(v) for v in point_cloud_range)
        unknown = set(overrides) - set(BEVFORMER_CONFIGS[variant].__dataclass_fields__)
        if unknown:
            raise ValueError(f"config has unknown fields {sorted(unknown)}")
        if "out_indices" in overrides:
            overrides["out_indices"] = tuple(overrides["out_indices"])
        self.model = BEVFormer(replace(BEVFORMER_CONFIGS[variant], **overrides))
        self.temporal = temporal
        self.backbone_lr_scale = backbone_lr_scale
        self.max_detections, self.score_threshold = max_detections, score_threshold
        pc = self.model.config.point_cloud_range
        self.post_center_range = (pc[0] - 10, pc[1] - 10, pc[2] - 5, pc[3] + 10, pc[4] + 10, pc[5] + 5)
        self.val_metric = NuScenesDetectionMetric(self.class_names, class_ranges=class_ranges)
        self.test_metric = NuScenesDetectionMetric(self.class_names, class_ranges=class_ranges)

    # ----------------------------------------------------------------- forward
    def _inputs(self, batch: dict) -> tuple[torch.Tensor, ...]:
        images, lidar2img, can_bus, prev_exists = (
            batch["images"], batch["lidar2img"], batch["can_bus"], batch["prev_exists"]
        )  # fmt: skip
        if not self.temporal:
            images, lidar2img, can_bus = images[:, -1:], lidar2img[:, -1:], can_bus[:, -1:].clone()
            prev_exists = torch.zeros_like(prev_exists[:, -1:])
            can_bus[..., 0:3] = 0.0
            can_bus[..., 17] = 0.0
        return images, lidar2img, can_bus, prev_exists

    def forward(self, batch: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per decoder layer: class logits (B, Q, classes) and box codes (B, Q, 10)."""
        return self.model(*self._inputs(batch))

    def predict(self, batch: dict) -> list[dict[str, torch.Tensor]]:
        """Decoded boxes per sample: ``{"boxes" (K, 9), "scores", "labels"}`` in the ego frame."""
        logits, codes = self(batch)
        return self.model.head.decode(
            logits[-1], codes[-1], self.max_detections, self.score_threshold, self.post_center_range
        )

    # ---------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits, codes = self(batch)
        losses = self.model.head.loss(logits, codes, batch["gt_boxes"], batch["gt_labels"])
        size = batch["images"].shape[0]
        self.log("train/loss", losses["loss"], prog_bar=True, sync_dist=True, batch_size=size)
        self.log_dict({f"train/{k}": v for k, v in losses.items() if k.startswith("loss_")}, sync_dist=True,
                      batch_size=size)  # fmt: skip
        return losses["loss"]

    def _evaluate(self, batch: dict, stage: str, metric: NuScenesDetectionMetric) -> None:
        logits, codes = self(batch)
        losses = self.model.head.loss(logits, codes, batch["gt_boxes"], batch["gt_labels"])
        self.log(f"{stage}/loss", losses["loss"], sync_dist=True, batch_size=batch["images"].shape[0])
        preds = self.model.head.decode(
            logits[-1], codes[-1], self.max_detections, self.score_threshold, self.post_center_range
        )
        targets = [
            {"boxes": b, "labels": lab, "attributes": a}
            for b, lab, a in zip(batch["gt_boxes"], batch["gt_labels"], batch["gt_attributes"])
        ]
        metric.update(preds, targets)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_metric)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_metric)

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict[str, torch.Tensor]]:
        return self.predict(batch)

    def _log_metric(self, stage: str, metric: NuScenesDetectionMetric) -> None:
        results = metric.compute()
        self.log(f"{stage}/mAP", results.pop("mAP"), prog_bar=True)
        self.log(f"{stage}/NDS", results.pop("NDS"), prog_bar=True)
        self.log_dict({f"{stage}/{k}": v for k, v in results.items()})
        metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_metric("val", self.val_metric)

    def on_test_epoch_end(self) -> None:
        self._log_metric("test", self.test_metric)

    # --------------------------------------------------------------- optimizer
    def parameter_groups(self) -> list[dict]:
        groups = weight_decay_groups(self)
        if self.backbone_lr_scale == 1.0:
            return groups
        backbone = {id(p) for p in self.model.camera_encoder.backbone.parameters()}
        split = []
        for group in groups:
            inside = [p for p in group["params"] if id(p) in backbone]
            outside = [p for p in group["params"] if id(p) not in backbone]
            extra = {k: v for k, v in group.items() if k != "params"}
            if outside:
                split.append({**extra, "params": outside})
            if inside:
                split.append({**extra, "params": inside, "lr_scale": self.backbone_lr_scale})
        return split
