"""From planned waypoints to controls: pure pursuit for the steering, the first step's kinematics for the pedal.

The planner is evaluated open loop, as on nuScenes; this converter is what a closed loop would run after it.
Pure pursuit steers onto the circle through the ego (heading +x) and a look-ahead point of the plan, with a
kinematic bicycle model: ``curvature = 2 sin(alpha) / d``, ``steer = atan(wheelbase * curvature)``, where ``d`` is
the look-ahead point's distance and ``alpha`` its bearing. On a plan that is an arc it gives exactly that arc's
steering. The acceleration is the constant one that covers the distance to the first waypoint (its chord) in one step.
"""

from __future__ import annotations

import torch

__all__ = ["pure_pursuit"]


def pure_pursuit(
    waypoints: torch.Tensor, speed: torch.Tensor, wheelbase: float = 2.85, lookahead_time: float = 1.0,
    min_lookahead: float = 2.0, dt: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``waypoints`` (B, H, 2) in the ego frame, ``speed`` (B,) m/s -> steering angle (B,) rad (left positive)
    and longitudinal acceleration (B,) m/s^2.

    The look-ahead point is the first waypoint at least ``max(min_lookahead, lookahead_time * speed)`` metres
    away (the last one if none is); a plan that stays within 5 cm of the ego steers straight."""
    distance = torch.linalg.vector_norm(waypoints, dim=-1)  # (B, H)
    reach = (lookahead_time * speed).clamp(min=min_lookahead)
    far_enough = distance >= reach[:, None]
    last = torch.full_like(speed, waypoints.shape[1] - 1, dtype=torch.long)
    index = torch.where(far_enough.any(-1), far_enough.float().argmax(-1), last)
    target = waypoints[torch.arange(len(waypoints)), index]
    d = torch.linalg.vector_norm(target, dim=-1)
    curvature = torch.where(d > 0.05, 2 * target[:, 1] / d.clamp(min=0.05) ** 2, torch.zeros_like(d))
    steer = torch.atan(wheelbase * curvature)
    first = torch.linalg.vector_norm(waypoints[:, 0], dim=-1)
    acceleration = 2 * (first - speed * dt) / dt**2
    return steer, acceleration
