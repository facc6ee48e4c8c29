"""Open-loop planning metrics: L2 error and collision rate at 1, 2 and 3 s, on all samples and on the reactive
ones: the samples whose future leaves constant velocity and yaw rate by more than 1 m (the data's ``reactive``
flag). In the embedded planning scenes no key frame is already braking, so a reactive sample's future deviates
while its past does not, and the ego's own motion cannot tell its future.

Two definitions are in use on nuScenes, and published tables mix them (VAD#47, UniAD#166); both are computed:

- **UniAD** (``planning_metrics.py``, ``planning_evaluation_strategy="uniad"``): the value **at** the horizon:
  L2 ``plan_L2_{1,2,3}s`` is the mean L2 error of waypoint 2, 4, 6; collision ``plan_col_{1,2,3}s`` the fraction
  of samples whose ego box overlaps an agent's box at that waypoint.
- **ST-P3 / VAD** (``compute_planner_metric_stp3``): the value at N s is the **mean over the first 2N
  waypoints** of the per-waypoint values: ``plan_L2_avg_{1,2,3}s``, ``plan_col_avg_{1,2,3}s``.

``plan_L2`` / ``plan_col`` (and ``_avg``) are the means of the three horizons, as both papers' "Avg." column.
Every key is repeated with ``plan_reactive_`` for the reactive subset (NaN when a stage has none).

As in UniAD, a (sample, waypoint) pair where the ground-truth trajectory itself collides is left out of the
collision rate, and L2 counts only valid waypoints (``ego_fut_mask``). The ego box is UniAD's 1.85 x 4.084 m,
centred on the waypoint and headed along the trajectory; agents are their ground-truth future boxes. Overlap
is tested exactly on the oriented boxes (separating axes), where UniAD rasterises boxes on a 0.5 m grid.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from zoo.bev.planner import pad_agents
from zoo.bev.trajectory import boxes_overlap, ego_boxes

__all__ = ["PlanningMetric", "collisions"]

HORIZONS = (1, 2, 3)  # seconds; waypoints at 2 Hz
SUBSETS = ("", "reactive_")


def collisions(waypoints: torch.Tensor, agent_fut: list[torch.Tensor], agent_mask: list[torch.Tensor]):
    """(B, H) bool: the ego box at each waypoint overlaps some agent's box at the same step."""
    agents, masks = pad_agents(agent_fut, agent_mask)
    ego = ego_boxes(waypoints.to(agents.dtype))[:, None]  # (B, 1, H, 5)
    return (boxes_overlap(ego, agents) & (masks > 0)).any(dim=1)


class PlanningMetric(Metric):
    """L2 and collision rate per waypoint, summed over samples; ``compute`` gives both definitions.

    ``update(waypoints (B, H, 2), ego_fut (B, H, 2), ego_fut_mask (B, H), agent_fut [(K, H, 5)],
    agent_fut_mask [(K, H)], reactive (B,))``.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, steps: int = 6, **kwargs) -> None:
        super().__init__(**kwargs)
        self.steps = steps
        for subset in SUBSETS:
            for name in ("l2_sum", "l2_count", "col_sum", "col_count"):
                self.add_state(
                    f"{subset}{name}", torch.zeros(steps, dtype=torch.float64), dist_reduce_fx="sum"
                )

    def update(
        self, waypoints: torch.Tensor, ego_fut: torch.Tensor, ego_fut_mask: torch.Tensor,
        agent_fut: list[torch.Tensor], agent_fut_mask: list[torch.Tensor], reactive: torch.Tensor,
    ) -> None:  # fmt: skip
        waypoints, ego_fut = waypoints.detach().double(), ego_fut.double()
        valid = ego_fut_mask.double()
        l2 = torch.linalg.vector_norm(waypoints - ego_fut, dim=-1) * valid
        agents = [a.double() for a in agent_fut]
        hit = collisions(waypoints, agents, agent_fut_mask).double()
        counted = valid * (~collisions(ego_fut, agents, agent_fut_mask)).double()
        for subset, rows in (
            ("", torch.ones_like(reactive, dtype=torch.bool)),
            ("reactive_", reactive.bool()),
        ):
            getattr(self, f"{subset}l2_sum").add_(l2[rows].sum(0))
            getattr(self, f"{subset}l2_count").add_(valid[rows].sum(0))
            getattr(self, f"{subset}col_sum").add_((hit * counted)[rows].sum(0))
            getattr(self, f"{subset}col_count").add_(counted[rows].sum(0))

    def compute(self) -> dict[str, torch.Tensor]:
        out = {}
        for subset in SUBSETS:
            for name in ("l2", "col"):
                per_step = getattr(self, f"{subset}{name}_sum") / getattr(self, f"{subset}{name}_count")
                key = f"plan_{subset}{'L2' if name == 'l2' else 'col'}"
                at = [per_step[2 * n - 1] for n in HORIZONS]
                averaged = [per_step[: 2 * n].mean() for n in HORIZONS]
                for n, value_at, value_avg in zip(HORIZONS, at, averaged):
                    out[f"{key}_{n}s"] = value_at.float()
                    out[f"{key}_avg_{n}s"] = value_avg.float()
                out[key] = torch.stack(at).mean().float()
                out[f"{key}_avg"] = torch.stack(averaged).mean().float()
        return out
