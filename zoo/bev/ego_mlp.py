"""The ego-status baseline (AD-MLP / BEV-Planner's Ego-MLP): plans from the ego's past states and the command
alone, with no perception, to show how much of an open-loop planning score needs no eyes.

``EgoStatusMLP`` is ``zoo.bev.planner.PlanningHead`` without the agents and the BEV: the same ego encoder and the
same trajectory parameterisation (a residual on the constant-velocity-and-yaw-rate plan, one per command), so a
difference between the two is what perception adds. ``EgoStatusPlanner`` trains it on the same batches
(``BEVDetectionDataModule(planning=True)``; it reads only the planning fields).
"""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MetricCollection

from zoo.base import ZooModule
from zoo.bev.planner import EgoEncoder, planning_losses
from zoo.bev.planning_metrics import PlanningMetric
from zoo.bev.trajectory import EGO_STATUS_DIMS
from zoo.optim import WarmupCosineLR

__all__ = ["EgoStatusMLP", "EgoStatusPlanner"]


class EgoStatusMLP(nn.Module):
    """``ego_status`` (B, 11) and ``command`` (B,) -> waypoints (B, steps, 2)."""

    def __init__(self, hidden: int = 128, layers: int = 2, steps: int = 6, commands: int = 3) -> None:
        super().__init__()
        self.ego = EgoEncoder(hidden, steps, commands)
        blocks = []
        for _ in range(layers):
            blocks += [nn.ReLU(inplace=True), nn.Linear(hidden, hidden)]
        self.mlp = nn.Sequential(*blocks, nn.LayerNorm(hidden))

    def forward(self, ego_status: torch.Tensor, command: torch.Tensor) -> torch.Tensor:
        return self.ego.plan(self.mlp(self.ego.query(ego_status, command)), ego_status, command)


class EgoStatusPlanner(ZooModule):
    """The ego-status MLP as a LightningModule: L1 + collision loss as the BEV planner, the planning metrics.

    Args:
        hidden, layers: the MLP's width and depth.
        loss_weights: ``{"plan_l1", "plan_collision"}`` as ``BEVFormerPlanner``'s (defaults 1 and 0.5).
        plan_l1_beta: the waypoint loss's Huber width (m), as ``BEVFormerPlanner``'s.
    """

    progress_bar_metrics = ("val/plan_L2_3s",)

    def __init__(
        self,
        hidden: int = 128,
        layers: int = 2,
        loss_weights: dict[str, float] | None = None,
        plan_l1_beta: float = 1.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler)

    def configure_models(self) -> None:
        self.model = EgoStatusMLP(self.hparams.hidden, self.hparams.layers)
        self.loss_weights = {"plan_l1": 1.0, "plan_collision": 0.5, **(self.hparams.loss_weights or {})}

    def configure_metrics(self) -> MetricCollection:
        return MetricCollection({"planning": PlanningMetric()})

    def forward(self, ego_status: torch.Tensor, ego_command: torch.Tensor) -> torch.Tensor:
        return self.model(ego_status, ego_command)

    def example_inputs(self, batch_size: int = 2) -> tuple[torch.Tensor, ...]:
        status = torch.zeros(batch_size, EGO_STATUS_DIMS, device=self.device)
        status[:, 8] = 5.0
        return status, torch.full((batch_size,), 2, dtype=torch.long, device=self.device)

    def _step(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        waypoints = self(batch["ego_status"], batch["ego_command"])
        losses = planning_losses(waypoints, batch, l1_beta=self.hparams.plan_l1_beta)
        w = self.loss_weights
        losses["loss"] = w["plan_l1"] * losses["loss_plan_l1"] + w["plan_collision"] * losses["loss_plan_col"]
        return waypoints, losses

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        _, losses = self._step(batch)
        self.log_dict(
            {f"train/{k}": v for k, v in losses.items()}, sync_dist=True, batch_size=len(batch["ego_fut"])
        )
        return losses["loss"]

    def _evaluate(self, batch: dict, stage: str) -> None:
        waypoints, losses = self._step(batch)
        self.log(f"{stage}/loss", losses["loss"], sync_dist=True, batch_size=len(batch["ego_fut"]))
        self.update_metrics(
            stage, waypoints, batch["ego_fut"], batch["ego_fut_mask"], batch["agent_fut"], batch["agent_fut_mask"],
            batch["reactive"],
        )  # fmt: skip

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """One record per sample: ``{"id": token, "plan": [[x, y] x 6]}`` (metres, the key frame's ego frame)."""
        waypoints = self(batch["ego_status"], batch["ego_command"]).cpu().tolist()
        return [{"id": token, "plan": plan} for token, plan in zip(batch["token"], waypoints)]
