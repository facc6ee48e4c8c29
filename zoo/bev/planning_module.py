"""``BEVFormerPlanner``: BEVFormer with a planning head, trained jointly with detection or on a frozen detector."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MetricCollection

from zoo.bev.module import NETWORK_INPUTS, BEVFormerDetector, _key_frame_only
from zoo.bev.planner import PlanningHead, planning_losses
from zoo.bev.planning_metrics import PlanningMetric
from zoo.bev.safety_brake import brake_before_collision, predicted_footprints
from zoo.bev.trajectory import EGO_STATUS_DIMS
from zoo.errors import MissingFileError, ZooError
from zoo.optim import WarmupCosineLR

__all__ = ["PLANNER_INPUTS", "BEVFormerPlanner"]

#: Batch entries ``BEVFormerPlanner.forward`` takes, in order.
PLANNER_INPUTS = (*NETWORK_INPUTS, "ego_status", "ego_command")
DEFAULT_WEIGHTS = {"detection": 1.0, "plan_l1": 1.0, "plan_collision": 0.5}


def scale_gradient(tensor: torch.Tensor, share: float) -> torch.Tensor:
    """``tensor`` unchanged forward; backward passes ``share`` of the gradient (0: detached, 1: all of it)."""
    if share == 1.0:
        return tensor
    return tensor.detach() if share == 0.0 else share * tensor + (1.0 - share) * tensor.detach()


class BEVFormerPlanner(BEVFormerDetector):
    """End-to-end driving on BEVFormer: detection plus the ego's 3 s trajectory for a driving command.

    The detector's network stays ``self.model`` (its checkpoints load into it); the planning head
    (``zoo.bev.planner.PlanningHead``) is ``self.planner`` and reads the BEV and the last decoder layer's queries.
    The loss is ``detection * L_det + plan_l1 * L1 + plan_collision * L_col`` (``loss_weights``). Validation and
    test log the detection metrics and the planning ones (``zoo.bev.planning_metrics``: ``val/plan_L2_3s``,
    ``val/plan_col_3s``, ``val/plan_reactive_L2_3s`` ...).

    Args (besides ``BEVFormerDetector``'s):
        loss_weights: ``{"detection", "plan_l1", "plan_collision"}`` (missing keys: 1, 1, 0.5).
        perception: a ``BEVFormerDetector`` checkpoint: its network is loaded and frozen, and only the planner
            trains (the detection loss is then only logged); ``None`` trains both together.
        planner_kwargs: ``PlanningHead`` options (``num_heads``, ``layers``).
        planning_gradient: the share of the planning losses' gradient that flows back into perception through
            what the planner reads (BEV, queries, boxes, scores): 1 trains end to end as VAD does, 0 lets the
            planner read a detector that only the detection loss shapes; in between, scaled. The default 0.1:
            on the embedded scenes all of it cost 4 mAP points (two seeds) for no better plan, a tenth under one.
        plan_l1_beta: metres within which the waypoint L1 turns square (Huber; 0: plain L1). See
            ``zoo.bev.planner.planning_losses`` for why plain L1 collapses the planner onto constant velocity.
        safety_brake: outside training, slow the plan down along its own path so that the ego clears every
            detection scoring ``brake_score_threshold`` or more, moved on at its predicted velocity and grown by
            ``brake_margin`` metres (``zoo.bev.safety_brake``: the network decides to react, geometry where to
            stop). Validation, test and prediction see the braked plan; the losses the network's.
    """

    progress_bar_metrics = ("val/mAP", "val/plan_L2_3s")

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
        loss_weights: dict[str, float] | None = None,
        perception: str | None = None,
        planner_kwargs: dict | None = None,
        planning_gradient: float = 0.1,
        plan_l1_beta: float = 1.0,
        safety_brake: bool = True,
        brake_score_threshold: float = 0.4,
        brake_margin: float = 2.0,
        compile: bool | dict = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
    ) -> None:
        unknown = set(loss_weights or {}) - set(DEFAULT_WEIGHTS)
        if unknown:
            raise ZooError(
                f"loss_weights has unknown keys {sorted(unknown)}; expected some of {sorted(DEFAULT_WEIGHTS)}"
            )
        super().__init__(
            model_name, model_kwargs, class_names, point_cloud_range, temporal, backbone_lr_scale,
            max_detections, score_threshold, class_ranges, compile, optimizer, lr_scheduler,
        )  # fmt: skip

    def configure_models(self) -> None:
        super().configure_models()
        config = self.model.config
        self.loss_weights = {**DEFAULT_WEIGHTS, **(self.hparams.loss_weights or {})}
        self.planner = PlanningHead(
            config.embed_dims, (config.bev_h, config.bev_w), config.point_cloud_range,
            **(self.hparams.planner_kwargs or {}),
        )  # fmt: skip
        if self.hparams.perception is not None:
            self._load_perception(self.hparams.perception)

    def _load_perception(self, path: str) -> None:
        if not Path(path).is_file():
            raise MissingFileError(
                f"perception checkpoint {path!r} does not exist (a BEVFormerDetector checkpoint)"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        network = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        self.model.load_state_dict(network)
        self.model.requires_grad_(False).eval()

    def configure_metrics(self) -> MetricCollection:
        """The detector's nuScenes metrics (default group) and the planning metrics (``planning`` group)."""
        return {"": super().configure_metrics(), "planning": MetricCollection({"planning": PlanningMetric()})}

    def safely_braked(
        self, waypoints: torch.Tensor, detections: list[dict[str, torch.Tensor]]
    ) -> torch.Tensor:
        """``waypoints`` retimed to clear ``detections`` (decoded boxes) when ``safety_brake`` is on."""
        hp = self.hparams
        if not hp.safety_brake:
            return waypoints
        agents, masks = predicted_footprints(
            detections, waypoints.shape[1], score_threshold=hp.brake_score_threshold, margin=hp.brake_margin
        )
        return brake_before_collision(waypoints, agents.to(waypoints.dtype), masks)

    @property
    def frozen_perception(self) -> bool:
        return self.hparams.perception is not None

    def train(self, mode: bool = True) -> BEVFormerPlanner:
        """A frozen detector stays in eval mode while the planner trains: in train mode its BatchNorm statistics
        would still follow the batches (and its dropout draw), so "frozen" perception would drift."""
        super().train(mode)
        if self.frozen_perception:
            self.model.eval()
        return self

    # ----------------------------------------------------------------- forward
    def forward(
        self, images: torch.Tensor, lidar2img: torch.Tensor, can_bus: torch.Tensor, prev_exists: torch.Tensor,
        ego_status: torch.Tensor, ego_command: torch.Tensor,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:  # fmt: skip
        """The detector's inputs plus ``ego_status`` (B, 11) and ``ego_command`` (B,) -> per decoder layer
        logits and box codes, and the waypoints (B, 6, 2) in the key frame's ego frame."""
        if not self.hparams.temporal:
            images, lidar2img, can_bus, prev_exists = _key_frame_only(images, lidar2img, can_bus, prev_exists)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_perception):
            bev = self.model.encode(images, lidar2img, can_bus, prev_exists)
            logits, codes, queries = self.model.detect(bev, return_queries=True)
        scores = logits[-1].sigmoid().amax(dim=-1)
        motion = codes[-1][..., [0, 1, 8, 9]]  # centre x, y and velocity vx, vy
        share = self.hparams.planning_gradient
        bev, queries, motion, scores = (scale_gradient(x, share) for x in (bev, queries, motion, scores))
        waypoints = self.planner(bev, queries, motion, scores, ego_status, ego_command)
        return logits, codes, waypoints

    def example_inputs(self, batch_size: int = 2) -> tuple[torch.Tensor, ...]:
        """The detector's example inputs, the ego cruising at 5 m/s (past positions 2.5 m apart), go straight."""
        status = torch.zeros(batch_size, EGO_STATUS_DIMS, device=self.device)
        status[:, 0:8:2] = torch.tensor([-10.0, -7.5, -5.0, -2.5])
        status[:, 8] = 5.0
        command = torch.full((batch_size,), 2, dtype=torch.long, device=self.device)
        return (*super().example_inputs(batch_size), status, command)

    def predict(self, batch: dict) -> list[dict[str, torch.Tensor]]:
        """Decoded boxes per sample, and its ``plan`` (6, 2), after the safety brake when it is on."""
        missing = [key for key in PLANNER_INPUTS if key not in batch]
        if missing:
            raise ZooError(
                f"the planner needs {missing} in each sample: give the data module planning=true (info files "
                "with VAD's planning fields); serving requests carry no ego status, so serve the detector config"
            )
        logits, codes, waypoints = self(*(batch[key] for key in PLANNER_INPUTS))
        detections = self._decode(logits[-1], codes[-1])
        return [{**d, "plan": w} for d, w in zip(detections, self.safely_braked(waypoints, detections))]

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """The detector's record with ``"plan"``: the 6 waypoints ``[[x, y], ...]`` (0.5 ... 3 s ahead, the
        sample's LiDAR/ego frame, metres)."""
        predictions = self.predict(batch)
        records = self._records(batch, predictions)
        for record, pred in zip(records, predictions):
            record["plan"] = pred["plan"].cpu().tolist()
        return records

    # ---------------------------------------------------------------- training
    def _losses(self, batch: dict) -> tuple[dict[str, torch.Tensor], list, list, torch.Tensor]:
        logits, codes, waypoints = self(*(batch[key] for key in PLANNER_INPUTS))
        detection = self.model.head.loss(logits, codes, batch["gt_boxes"], batch["gt_labels"])
        planning = planning_losses(waypoints, batch, l1_beta=self.hparams.plan_l1_beta)
        weights = self.loss_weights
        loss = (
            weights["plan_l1"] * planning["loss_plan_l1"]
            + weights["plan_collision"] * planning["loss_plan_col"]
        )
        if not self.frozen_perception:
            loss = loss + weights["detection"] * detection["loss"]
        losses = {
            "loss": loss,
            "loss_det": detection["loss"].detach(),
            **{k: v.detach() for k, v in planning.items()},
            **{k: v for k, v in detection.items() if k.startswith("loss_")},
        }
        return losses, logits, codes, waypoints

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses, *_ = self._losses(batch)
        size = batch["images"].shape[0]
        self.log("train/loss", losses["loss"], prog_bar=True, sync_dist=True, batch_size=size)
        self.log_dict({f"train/{k}": v for k, v in losses.items() if k.startswith("loss_")}, sync_dist=True,
                      batch_size=size)  # fmt: skip
        return losses["loss"]

    def _evaluate(self, batch: dict, stage: str) -> None:
        losses, logits, codes, waypoints = self._losses(batch)
        size = batch["images"].shape[0]
        self.log(f"{stage}/loss", losses["loss"], sync_dist=True, batch_size=size)
        targets = [
            {"boxes": b, "labels": lab, "attributes": a}
            for b, lab, a in zip(batch["gt_boxes"], batch["gt_labels"], batch["gt_attributes"])
        ]
        detections = self._decode(logits[-1], codes[-1])
        self.update_metrics(stage, detections, targets)
        self.update_metrics(
            stage, self.safely_braked(waypoints, detections), batch["ego_fut"], batch["ego_fut_mask"], batch["agent_fut"],
            batch["agent_fut_mask"], batch["reactive"], group="planning",
        )  # fmt: skip
