"""The planner's last step: keep its path, and slow down along it so that the ego box stays clear of what the
detector sees.

Why a step after the network: the planning head decides *whether* to react from what it reads of the agents, but
it regresses *where* to stop, and open loop a stopping point a metre too far is a collision, however right the
decision was. Geometry answers the second question exactly once the detections are known, so the planner does
not have to learn it. UniAD ends its planner the same way (a collision optimisation of the waypoints against the
predicted occupancy); here it is a path-velocity decomposition, the classic split of motion planning: the path
is the network's, only the progress along it is capped. The step can therefore only brake, never swerve or speed
up, and a plan that meets no detection is returned unchanged.

Each confident detection (score >= ``score_threshold``) moves on at its predicted velocity (the detector's
``vx, vy``), and is grown by ``margin`` on every side for its localisation error. At each waypoint, the ego
box (UniAD's 1.85 x 4.084 m, headed along the path, as the metric places it) may advance along the path from
where it stands to where the network put it, and stops at the last place, sampled every ``1 / samples`` of that
stretch, before its box first overlaps a detection's box at that time. A waypoint that already overlaps where
it stands stays there (a stop is the most braking can do).
"""

from __future__ import annotations

import torch

from zoo.bev.planner import pad_agents
from zoo.bev.trajectory import EGO_SIZE, boxes_overlap, waypoint_headings

__all__ = ["brake_before_collision", "predicted_footprints"]


def predicted_footprints(
    detections: list[dict[str, torch.Tensor]], steps: int = 6, dt: float = 0.5, score_threshold: float = 0.4,
    margin: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Decoded detections (``boxes`` (K, 9) ``x, y, z, w, l, h, yaw, vx, vy`` and ``scores`` (K,) per sample)
    -> every confident one's footprint ``x, y, w, l, yaw`` at the ``steps`` future times, moving on at its
    velocity and grown by ``margin`` metres on each side: (B, K, steps, 5) and the mask (B, K, steps)."""
    futures, masks = [], []
    for detection in detections:
        boxes = detection["boxes"][detection["scores"] >= score_threshold]
        times = torch.arange(1, steps + 1, dtype=boxes.dtype, device=boxes.device) * dt
        centres = boxes[:, None, 0:2] + times[None, :, None] * boxes[:, None, 7:9]
        shape = (boxes[:, [3, 4, 6]] + boxes.new_tensor([2 * margin, 2 * margin, 0.0]))[:, None]
        futures.append(torch.cat([centres, shape.expand(-1, steps, -1)], dim=-1))
        masks.append(boxes.new_ones(len(boxes), steps))
    return pad_agents(futures, masks)


def _along_path(
    waypoints: torch.Tensor, arc: torch.Tensor, headings: torch.Tensor, distance: torch.Tensor
) -> torch.Tensor:
    """(B, N, 5): the ego box at arc lengths ``distance`` (B, N) along the polyline from the origin through
    ``waypoints`` (B, H, 2), whose vertices lie at ``arc`` (B, H + 1); each box headed as its segment."""
    segment = torch.searchsorted(arc[:, 1:].contiguous(), distance).clamp(max=waypoints.shape[1] - 1)
    start = torch.cat([torch.zeros_like(waypoints[:, :1]), waypoints[:, :-1]], dim=1)
    index = segment[..., None].expand(-1, -1, 2)
    begin, end = start.gather(1, index), waypoints.gather(1, index)
    length = (arc[:, 1:] - arc[:, :-1]).gather(1, segment)
    fraction = ((distance - arc.gather(1, segment)) / length.clamp(min=1e-6)).clamp(0.0, 1.0)
    centre = begin + fraction[..., None] * (end - begin)
    size = centre.new_tensor(EGO_SIZE).expand(*centre.shape[:2], 2)
    return torch.cat([centre, size, headings.gather(1, segment)[..., None]], dim=-1)


@torch.no_grad()
def brake_before_collision(
    waypoints: torch.Tensor, agents: torch.Tensor, masks: torch.Tensor, samples: int = 32
) -> torch.Tensor:
    """(B, H, 2) waypoints retimed along their own path so that the ego box overlaps none of ``agents``
    (B, K, H, 5) boxes (``masks`` (B, K, H)) at the same step, as far as braking can achieve it."""
    batch = waypoints.shape[0]
    step = torch.linalg.vector_norm(
        torch.diff(waypoints, dim=1, prepend=waypoints.new_zeros(batch, 1, 2)), dim=-1
    )
    arc = torch.cat([waypoints.new_zeros(batch, 1), step.cumsum(dim=1)], dim=1)  # (B, H + 1)
    headings = waypoint_headings(waypoints)
    fractions = torch.linspace(0.0, 1.0, samples + 1, dtype=waypoints.dtype, device=waypoints.device)
    reached = waypoints.new_zeros(batch)
    out = []
    for k in range(waypoints.shape[1]):
        candidates = reached[:, None] + (arc[:, k + 1] - reached)[:, None] * fractions  # (B, N)
        ego = _along_path(waypoints, arc, headings, candidates)
        hit = boxes_overlap(ego[:, :, None], agents[:, None, :, k]) & (masks[:, None, :, k] > 0)
        blocked = hit.any(dim=-1)  # (B, N)
        free = ~blocked.any(dim=1)
        last_clear = (blocked.float().argmax(dim=1) - 1).clamp(min=0)  # a blocked start: stay
        reached = torch.where(free, arc[:, k + 1], candidates.gather(1, last_clear[:, None])[:, 0])
        braked = _along_path(waypoints, arc, headings, reached[:, None])[:, 0, :2]
        out.append(torch.where(free[:, None], waypoints[:, k], braked))
    return torch.stack(out, dim=1)
