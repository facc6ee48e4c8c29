"""Ego-trajectory geometry shared by the planning data, head, losses, metric and baselines.

Waypoints are ``(x, y)`` in the key frame's ego (LiDAR) frame, metres, one every ``dt`` seconds after it
(nuScenes planning: 6 at 2 Hz). Boxes for collision checks are ``(x, y, w, l, yaw)``, ``l`` along the heading.
"""

from __future__ import annotations

import torch

__all__ = [
    "EGO_STATUS_DIMS",
    "box_corners",
    "boxes_overlap",
    "constant_velocity_plan",
    "deviates_from_constant_velocity",
    "ego_boxes",
    "route_coordinates",
    "waypoint_headings",
]

#: ``ego_status``: 4 past positions (x, y, oldest first, in the key frame's ego frame), speed (m/s),
#: yaw rate (rad/s), longitudinal acceleration (m/s^2). What AD-MLP feeds its MLP, besides the command.
EGO_STATUS_DIMS = 11
#: The ego box (w, l), as UniAD's planning evaluation places it.
EGO_SIZE = (1.85, 4.084)


def constant_velocity_plan(
    speed: torch.Tensor, yaw_rate: torch.Tensor | None = None, steps: int = 6, dt: float = 0.5
) -> torch.Tensor:
    """(B, steps, 2): the ego keeps its speed (and, if given, its yaw rate: a constant-turn-rate model).

    Without ``yaw_rate`` the ego drives straight ahead (+x), the plain constant-velocity baseline."""
    t = torch.arange(1, steps + 1, dtype=speed.dtype, device=speed.device) * dt
    distance = speed[:, None] * t
    if yaw_rate is None:
        return torch.stack([distance, torch.zeros_like(distance)], dim=-1)
    curvature = yaw_rate / speed.clamp(min=1e-3)
    angle = curvature[:, None] * distance
    straight = curvature.abs()[:, None] < 1e-6
    safe = torch.where(straight, torch.ones_like(curvature[:, None]), curvature[:, None])
    x = torch.where(straight, distance, torch.sin(angle) / safe)
    y = torch.where(straight, torch.zeros_like(distance), (1 - torch.cos(angle)) / safe)
    return torch.stack([x, y], dim=-1)


def route_coordinates(
    points: torch.Tensor, speed: torch.Tensor, yaw_rate: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where ``points`` (B, ..., 2) lie relative to the route the ego drives keeping its speed and yaw rate (the
    arc of ``constant_velocity_plan``): arc length ``s`` along it from the ego, signed offset ``l`` from it (left
    positive), and the route's heading at ``s`` (Frenet coordinates; a straight route gives x, y and 0).

    What a planner must know of an agent is whether it is, or will be, on the ego's way, and how far along;
    in the ego's Cartesian frame that depends on the ego's own curvature, in these coordinates it does not."""
    shape = (-1,) + (1,) * (points.dim() - 2)
    curvature = (yaw_rate / speed.clamp(min=0.5)).reshape(shape)
    straight = curvature.abs() < 1e-4
    radius = 1 / torch.where(
        straight, torch.ones_like(curvature), curvature
    )  # signed: the centre is (0, radius)
    dx, dy = points[..., 0], points[..., 1] - radius
    along = radius * torch.atan2(radius * dx, -radius * dy)
    offset = torch.sign(radius) * (radius.abs() - torch.sqrt(dx**2 + dy**2))
    s = torch.where(straight, points[..., 0], along)
    lateral = torch.where(straight, points[..., 1], offset)
    return s, lateral, torch.where(straight, torch.zeros_like(s), s * curvature)


def deviates_from_constant_velocity(
    future: torch.Tensor, speed: torch.Tensor, yaw_rate: torch.Tensor, mask: torch.Tensor | None = None,
    threshold: float = 1.0, dt: float = 0.5,
) -> torch.Tensor:  # fmt: skip
    """(B,) bool: some valid waypoint of ``future`` (B, H, 2) is more than ``threshold`` metres from where the
    ego would be keeping its current speed and yaw rate: the "reactive" samples, where the ego's own motion
    does not tell its future."""
    expected = constant_velocity_plan(speed, yaw_rate, future.shape[1], dt)
    error = torch.linalg.vector_norm(future - expected, dim=-1)
    if mask is not None:
        error = error * mask
    return error.amax(dim=-1) > threshold


def waypoint_headings(waypoints: torch.Tensor) -> torch.Tensor:
    """(..., H): heading of each waypoint from the displacement that reaches it (from the origin for the
    first); where the ego barely moves (< 5 cm) it keeps the previous heading (0 at the start)."""
    previous = torch.cat([torch.zeros_like(waypoints[..., :1, :]), waypoints[..., :-1, :]], dim=-2)
    step = waypoints - previous
    heading = torch.atan2(step[..., 1], step[..., 0])
    moving = torch.linalg.vector_norm(step, dim=-1) > 0.05
    out = []
    last = torch.zeros_like(heading[..., 0])
    for k in range(heading.shape[-1]):
        last = torch.where(moving[..., k], heading[..., k], last)
        out.append(last)
    return torch.stack(out, dim=-1)


def ego_boxes(waypoints: torch.Tensor) -> torch.Tensor:
    """(..., H, 5): the ego box at each waypoint, headed along the trajectory."""
    width, length = (torch.full_like(waypoints[..., 0], v) for v in EGO_SIZE)
    return torch.stack(
        [waypoints[..., 0], waypoints[..., 1], width, length, waypoint_headings(waypoints)], dim=-1
    )


def box_corners(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 5) ``x, y, w, l, yaw`` -> (..., 4, 2) corners."""
    x, y, width, length, yaw = boxes.unbind(-1)
    c, s = torch.cos(yaw), torch.sin(yaw)
    local = torch.tensor([[1, 1], [1, -1], [-1, -1], [-1, 1]], dtype=boxes.dtype, device=boxes.device) / 2
    dx, dy = local[:, 0] * length[..., None], local[:, 1] * width[..., None]
    return torch.stack([x[..., None] + c[..., None] * dx - s[..., None] * dy,
                        y[..., None] + s[..., None] * dx + c[..., None] * dy], dim=-1)  # fmt: skip


def boxes_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Whether oriented boxes ``a`` and ``b`` (broadcastable (..., 5)) intersect: the separating axis test on
    both boxes' edge normals (exact for rectangles; touching counts as overlapping)."""
    ca, cb = box_corners(a), box_corners(b)
    ca, cb = torch.broadcast_tensors(ca, cb)
    ya, yb = torch.broadcast_tensors(a[..., 4], b[..., 4])
    axes = torch.stack(
        [
            torch.stack([torch.cos(y), torch.sin(y)], -1)
            for y in (ya, ya + torch.pi / 2, yb, yb + torch.pi / 2)
        ],
        dim=-2,
    )  # (..., 4, 2)
    pa = torch.einsum("...ck,...ak->...ac", ca, axes)  # (..., axes, corners)
    pb = torch.einsum("...ck,...ak->...ac", cb, axes)
    separated = (pa.amax(-1) < pb.amin(-1)) | (pb.amax(-1) < pa.amin(-1))
    return ~separated.any(-1)
