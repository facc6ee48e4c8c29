"""``BEVFormerDetector``: BEVFormer as a LightningModule, scored with the nuScenes detection metrics."""

from __future__ import annotations

from dataclasses import replace

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MetricCollection

from zoo.base import ZooModule
from zoo.bev.decoder import DetectionDecoderLayer
from zoo.bev.encoder import BEVEncoderLayer
from zoo.bev.metrics import ATTRIBUTE_NAMES, NuScenesDetectionMetric, default_attributes
from zoo.bev.model import BEVFORMER_CONFIGS, NUSCENES_CLASSES, BEVFormer
from zoo.bev.records import box_to_submission, draw_top_down
from zoo.optim import WarmupCosineLR, weight_decay_groups

__all__ = ["NETWORK_INPUTS", "BEVFormerDetector"]

#: Batch entries ``forward`` takes, in order.
NETWORK_INPUTS = ("images", "lidar2img", "can_bus", "prev_exists")
#: Camera images of ``example_inputs``: the embedded scenes' size.
EXAMPLE_IMG_SIZE = (64, 112)


class BEVFormerDetector(ZooModule):
    """Multi-camera 3D detection with BEVFormer.

    Args:
        model_name: a key of ``zoo.bev.BEVFORMER_CONFIGS`` (``bevformer_tiny``/``small``/``base`` as
            published, ``bevformer_cpu`` for the synthetic scenes).
        model_kwargs: overrides of the preset's ``BEVFormerConfig`` fields (``bev_h``, ``backbone``...).
        class_names: detection classes, linked from the data module; their number sets the head.
        point_cloud_range: BEV range in metres, linked from the data module.
        temporal: use the data's history frames (temporal self-attention over the previous BEV); False
            detects from the key frame alone (the attention then sees only the current BEV).
        backbone_lr_scale: learning-rate factor of the image backbone (BEVFormer: 0.1 with pretrained weights).
        max_detections / score_threshold: decoding (top-k over query x class scores, then the threshold).
        class_ranges: per class evaluation radius (metres) of the metric; default nuScenes'.
        compile: ``torch.compile`` the network (``self.model``) when a trainer sets the module up: ``true``, or a
            dict of ``torch.compile`` options (``mode``, ``fullgraph``, ``dynamic``, ``backend``, ``options``);
            checkpoints are the same as without it (``ZooModule.compile_network``).
    """

    sharding_units = (BEVEncoderLayer, DetectionDecoderLayer)
    progress_bar_metrics = ("val/mAP", "val/NDS")
    hparams_renames = (("variant", "model_name"), ("config", "model_kwargs"))
    #: the data module's renamed arguments, which its hyper-parameters in a fit checkpoint still carry
    datamodule_hparams_renames = {"image_size": "img_size"}

    @classmethod
    def upgrade_checkpoint(cls, checkpoint: dict) -> dict:
        """The base's upgrade, and the data module's ``image_size`` -> ``img_size`` too."""
        upgraded = super().upgrade_checkpoint(checkpoint)
        if "datamodule_hyper_parameters" in upgraded:
            renames = cls.datamodule_hparams_renames
            data = upgraded["datamodule_hyper_parameters"]
            upgraded["datamodule_hyper_parameters"] = {renames.get(k, k): v for k, v in data.items()}
        return upgraded

    def __init__(
        self,
        model_name: str = "bevformer_cpu",
        model_kwargs: dict | None = None,
        class_names: list[str] | None = None,
        point_cloud_range: list[float] | None = None,
        temporal: bool = True,
        backbone_lr_scale: float = 1.0,
        max_detections: int = 100,
        score_threshold: float = 0.0,
        class_ranges: dict[str, float] | None = None,
        compile: bool | dict = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
    ) -> None:
        if model_name not in BEVFORMER_CONFIGS:
            raise ValueError(f"model_name {model_name!r} is not one of {sorted(BEVFORMER_CONFIGS)}")
        unknown = set(model_kwargs or {}) - set(BEVFORMER_CONFIGS[model_name].__dataclass_fields__)
        if unknown:
            raise ValueError(f"model_kwargs has unknown fields {sorted(unknown)}")
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler)

    # ------------------------------------------------------------------ hooks
    def configure_models(self) -> None:
        hp = self.hparams
        preset = BEVFORMER_CONFIGS[hp.model_name]
        self.class_names = list(hp.class_names or NUSCENES_CLASSES[: preset.num_classes])
        overrides = {**(hp.model_kwargs or {}), "num_classes": len(self.class_names)}
        if hp.point_cloud_range is not None:
            overrides["point_cloud_range"] = tuple(float(v) for v in hp.point_cloud_range)
        if "out_indices" in overrides:
            overrides["out_indices"] = tuple(overrides["out_indices"])
        self.model = BEVFormer(replace(preset, **overrides))
        pc = self.model.config.point_cloud_range
        self.post_center_range = (pc[0] - 10, pc[1] - 10, pc[2] - 5, pc[3] + 10, pc[4] + 10, pc[5] + 5)

    def configure_metrics(self) -> MetricCollection:
        """The nuScenes metrics, flattened by the base to ``<stage>/mAP``, ``<stage>/NDS``, ``<stage>/mATE``
        ... ``<stage>/AP_<class>``; their states are not persistent, so checkpoints hold only the network."""
        return MetricCollection(
            {"nuscenes": NuScenesDetectionMetric(self.class_names, class_ranges=self.hparams.class_ranges)}
        )

    # ----------------------------------------------------------------- forward
    def forward(
        self, images: torch.Tensor, lidar2img: torch.Tensor, can_bus: torch.Tensor, prev_exists: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """A queue of frames, the last one detected -> per decoder layer: class logits (B, Q, classes) and box
        codes (B, Q, 10).

        ``images`` (B, T, cameras, 3, H, W), ``lidar2img`` (B, T, cameras, 4, 4), ``can_bus`` (B, T, 18),
        ``prev_exists`` (B, T) bool; with ``temporal=False`` the history frames are dropped here.
        """
        if not self.hparams.temporal:
            images, lidar2img, can_bus, prev_exists = _key_frame_only(images, lidar2img, can_bus, prev_exists)
        return self.model(images, lidar2img, can_bus, prev_exists)

    def example_inputs(self, batch_size: int = 2) -> tuple[torch.Tensor, ...]:
        """``forward``'s inputs for ``batch_size`` samples of two frames (one history frame): 64 x 112 images
        seen by the nuScenes camera rig, the ego 2 m further on in the key frame."""
        from zoo.datamodules.bev_scenes import CAMERA_NAMES, nuscenes_rig

        config, frames = self.model.config, 2
        rig = nuscenes_rig(EXAMPLE_IMG_SIZE, CAMERA_NAMES[: config.num_cameras])
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(batch_size, frames, len(rig.names), 3, *EXAMPLE_IMG_SIZE, generator=generator)
        lidar2img = torch.from_numpy(rig.lidar2img).float().repeat(batch_size, frames, 1, 1, 1)
        can_bus = torch.zeros(batch_size, frames, config.can_bus_dims)
        can_bus[:, 1, 0] = 2.0
        prev_exists = torch.tensor([[False, True]]).repeat(batch_size, 1)
        return tuple(t.to(self.device) for t in (images, lidar2img, can_bus, prev_exists))

    def export_graphs(self) -> list:
        """What ``zoo export --format pt2|onnx`` writes: one frame (``zoo.bev.export.FrameGraph``: cameras,
        CAN bus and the previous frame's BEV in; the last decoder layer's logits and box codes and the frame's
        BEV out), with a dynamic batch. The temporal queue stays in Python (``zoo.bev.export.run_queue``)."""
        from zoo.bev.export import frame_graph

        return [frame_graph(self)]

    def _decode(self, logits: torch.Tensor, codes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        hp = self.hparams
        return self.model.head.decode(
            logits, codes, hp.max_detections, hp.score_threshold, self.post_center_range
        )

    def predict(self, batch: dict) -> list[dict[str, torch.Tensor]]:
        """Decoded boxes per sample: ``{"boxes" (K, 9), "scores", "labels"}`` in its LiDAR (ego) frame."""
        logits, codes = self(*(batch[key] for key in NETWORK_INPUTS))
        return self._decode(logits[-1], codes[-1])

    # ---------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits, codes = self(*(batch[key] for key in NETWORK_INPUTS))
        losses = self.model.head.loss(logits, codes, batch["gt_boxes"], batch["gt_labels"])
        size = batch["images"].shape[0]
        self.log("train/loss", losses["loss"], prog_bar=True, sync_dist=True, batch_size=size)
        self.log_dict({f"train/{k}": v for k, v in losses.items() if k.startswith("loss_")}, sync_dist=True,
                      batch_size=size)  # fmt: skip
        return losses["loss"]

    def _evaluate(self, batch: dict, stage: str) -> None:
        logits, codes = self(*(batch[key] for key in NETWORK_INPUTS))
        losses = self.model.head.loss(logits, codes, batch["gt_boxes"], batch["gt_labels"])
        self.log(f"{stage}/loss", losses["loss"], sync_dist=True, batch_size=batch["images"].shape[0])
        targets = [
            {"boxes": b, "labels": lab, "attributes": a}
            for b, lab, a in zip(batch["gt_boxes"], batch["gt_labels"], batch["gt_attributes"])
        ]
        self.update_metrics(stage, self._decode(logits[-1], codes[-1]), targets)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """One record per sample, in the nuScenes detection submission format
        (https://www.nuscenes.org/object-detection):

        - ``"id"``: the sample token (info files) or ``<split>_scene<k>_frame<f>`` (embedded scenes);
        - ``"boxes"``: one dict per detection, ``{"sample_token", "translation": [x, y, z], "size": [w, l, h],
          "rotation": [w, x, y, z] quaternion, "velocity": [vx, vy], "detection_name", "detection_score",
          "attribute_name"}``, translation/rotation/velocity in the global frame: the head predicts in the
          sample's LiDAR frame (the ego frame for the embedded scenes) and the batch's ``lidar2global`` pose
          moves each box (the embedded scenes' global frame is their world; info files without an ego pose
          leave the boxes in the LiDAR frame). The attribute follows the speed (``default_attributes``);
        - ``"top_down"``: a ``PIL.Image`` of the BEV range, predictions filled in their class colour with
          opacity = score, ground truth outlined (``zoo.bev.records.draw_top_down``).
        """
        return self._records(batch, self.predict(batch))

    def _records(self, batch: dict, predictions: list[dict[str, torch.Tensor]]) -> list[dict]:
        """``predict_step``'s records from the decoded boxes of each sample."""
        records = []
        for n, pred in enumerate(predictions):
            boxes, labels, scores = pred["boxes"].cpu(), pred["labels"].cpu(), pred["scores"].cpu()
            attributes = default_attributes(labels, boxes, self.class_names).tolist()
            token, pose = batch["token"][n], batch["lidar2global"][n].cpu().double().numpy()
            detections = [
                {
                    "sample_token": token,
                    **box_to_submission(box.tolist(), pose),
                    "detection_name": self.class_names[label],
                    "detection_score": score,
                    "attribute_name": ATTRIBUTE_NAMES[attribute] if attribute >= 0 else "",
                }
                for box, label, score, attribute in zip(boxes, labels.tolist(), scores.tolist(), attributes)
            ]
            top_down = draw_top_down(
                boxes.numpy(), labels.tolist(), scores.tolist(), batch["gt_boxes"][n].cpu().numpy(),
                batch["gt_labels"][n].tolist(), self.class_names, self.model.config.point_cloud_range,
            )  # fmt: skip
            records.append({"id": token, "boxes": detections, "top_down": top_down})
        return records

    # --------------------------------------------------------------- optimizer
    def parameter_groups(self) -> list[dict]:
        groups = weight_decay_groups(self)
        scale = self.hparams.backbone_lr_scale
        if scale == 1.0:
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
                split.append({**extra, "params": inside, "lr_scale": scale})
        return split


def _key_frame_only(
    images: torch.Tensor, lidar2img: torch.Tensor, can_bus: torch.Tensor, prev_exists: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """The last frame of each queue, as a first frame: no history, zero ego-motion deltas."""
    can_bus = can_bus[:, -1:].clone()
    can_bus[..., 0:3] = 0.0
    can_bus[..., 17] = 0.0
    return images[:, -1:], lidar2img[:, -1:], can_bus, torch.zeros_like(prev_exists[:, -1:])
