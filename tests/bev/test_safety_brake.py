"""The safety brake: it retimes a plan along its own path so the ego box clears the detections, never swerves or
speeds up, leaves a free road alone, and, given perfect perception, removes the embedded scenes' collisions."""

from __future__ import annotations

import numpy as np
import torch

from zoo.bev import PlanningMetric
from zoo.bev.planning_metrics import collisions
from zoo.bev.safety_brake import brake_before_collision, predicted_footprints
from zoo.bev.trajectory import constant_velocity_plan
from zoo.datamodules.bev import (
    DEFAULT_CLASSES,
    FUTURE_STEPS,
    PAST_STEPS,
    PLAN_DT,
    SPLITS,
    _scene_planning_fields,
)
from zoo.datamodules.bev_scenes import make_planning_scene


def detection(
    x: float, y: float = 0.0, vx: float = 0.0, vy: float = 0.0, score: float = 0.9, size=(1.9, 4.5)
):
    """One decoded detection (x, y, z, w, l, h, yaw, vx, vy), heading along +x."""
    box = torch.tensor([[x, y, 0.0, size[0], size[1], 1.6, 0.0, vx, vy]])
    return {"boxes": box, "scores": torch.tensor([score])}


def cruise(speed: float = 6.0) -> torch.Tensor:
    return constant_velocity_plan(torch.tensor([speed]))  # 3 m per step, straight ahead


def brake(plan: torch.Tensor, detections: list[dict], **kwargs) -> torch.Tensor:
    agents, masks = predicted_footprints(detections, **kwargs)
    return brake_before_collision(plan, agents, masks)


def test_footprints_move_at_the_predicted_velocity_and_grow_by_the_margin():
    boxes, mask = predicted_footprints([detection(10.0, vx=2.0, vy=-1.0)], margin=0.5)
    assert boxes.shape == (1, 1, 6, 5) and mask.all()
    torch.testing.assert_close(boxes[0, 0, :, 0], 10.0 + 2.0 * 0.5 * torch.arange(1.0, 7.0))
    torch.testing.assert_close(boxes[0, 0, :, 1], -0.5 * torch.arange(1.0, 7.0))
    torch.testing.assert_close(boxes[0, 0, 0, 2:], torch.tensor([2.9, 5.5, 0.0]))
    _, empty_mask = predicted_footprints([detection(10.0, score=0.1)], score_threshold=0.3)
    assert not empty_mask.any()


def test_a_free_road_leaves_the_plan_unchanged():
    plan = cruise()
    beside = detection(9.0, y=3.6)  # a parked car just clear of the ego's 1.85 m width
    assert torch.equal(brake(plan, [beside]), plan)
    assert torch.equal(brake(plan, [detection(12.0, score=0.2)]), plan)  # below the score threshold


def test_it_stops_short_of_a_stopped_car_on_the_path_and_only_brakes():
    plan = cruise()
    detections = [detection(12.0)]
    braked = brake(plan, detections)
    agents, masks = predicted_footprints(detections)
    assert not collisions(braked, [agents[0]], [masks[0]]).any()
    assert collisions(plan, [agents[0]], [masks[0]]).any()
    progress = braked[0, :, 0]
    assert torch.all(progress <= plan[0, :, 0]) and torch.all(torch.diff(progress) >= 0)
    torch.testing.assert_close(braked[0, :, 1], torch.zeros(6))  # on its own path: no swerve
    # it stops at the car: the ego's front (2.04 m ahead of its centre) within a sample step of the rear (9.75 m)
    assert 12.0 - 2.25 - 2.042 - 0.1 < progress[-1] < 12.0 - 2.25 - 2.042


def test_it_waits_for_a_crossing_pedestrian_and_drives_on_once_the_way_is_clear():
    plan = cruise(4.0)  # 2 m per step
    walker = detection(8.0, y=-3.0, vy=1.5, size=(0.7, 0.7))  # reaches the path at about 1 s, gone by 3 s
    braked = brake(plan, [walker], margin=0.0)
    agents, masks = predicted_footprints([walker], margin=0.0)
    assert collisions(plan, [agents[0]], [masks[0]]).any()
    assert not collisions(braked, [agents[0]], [masks[0]]).any()
    assert braked[0, 2, 0] < plan[0, 2, 0]  # held back while it crosses
    torch.testing.assert_close(braked[0, -1], plan[0, -1])  # the original plan again once it has passed


def test_a_curved_path_is_braked_along_the_curve():
    plan = constant_velocity_plan(torch.tensor([6.0]), torch.tensor([0.3]))  # a 20 m radius, turning left
    ahead = plan[0, 3]
    braked = brake(plan, [detection(float(ahead[0]) + 3.0, float(ahead[1]), size=(1.9, 1.9))])
    radius = torch.linalg.vector_norm(braked[0] - torch.tensor([0.0, 20.0]), dim=-1)
    # on the path: the chords between waypoints, which 3 m long sag 3^2 / (8 x 20) = 5.6 cm inside the arc
    assert torch.all((radius <= 20.0 + 1e-4) & (radius > 20.0 - 0.057))
    assert braked[0, -1, 0] < plan[0, 3, 0]


def test_with_ground_truth_detections_constant_velocity_no_longer_collides():
    """The embedded test scenes' every object as a perfect detection: constant velocity and yaw rate, braked,
    must keep clear of the obstacles it runs into (64.6% of the reactive samples at 3 s unbraked)."""
    raw, braked = PlanningMetric(), PlanningMetric()
    for index in range(24):
        rng = np.random.default_rng([0, SPLITS["test"], index])
        scene = make_planning_scene(
            rng, DEFAULT_CLASSES, num_frames=8, num_objects=30, radius=32.0, past=PAST_STEPS,
            future=FUTURE_STEPS, dt=PLAN_DT,
        )  # fmt: skip
        samples = [_scene_planning_fields(scene, frame) for frame in range(scene.num_frames)]
        status = torch.stack([s["ego_status"] for s in samples])
        plan = constant_velocity_plan(status[:, 8], status[:, 9])
        seen = [{"boxes": torch.as_tensor(scene.boxes(f), dtype=torch.float32),
                 "scores": torch.ones(len(scene.classes))} for f in range(scene.num_frames)]  # fmt: skip
        args = [torch.stack([s["ego_fut"] for s in samples]), torch.stack([s["ego_fut_mask"] for s in samples]),
                [s["agent_fut"] for s in samples], [s["agent_fut_mask"] for s in samples],
                torch.stack([s["reactive"] for s in samples])]  # fmt: skip
        raw.update(plan, *args)
        braked.update(brake(plan, seen), *args)
    raw, braked = raw.compute(), braked.compute()
    assert raw["plan_reactive_col_3s"] > 0.5
    assert braked["plan_reactive_col_3s"] < 0.05 and braked["plan_col_3s"] < 0.02
    assert braked["plan_reactive_L2_3s"] < 0.6 * raw["plan_reactive_L2_3s"]
