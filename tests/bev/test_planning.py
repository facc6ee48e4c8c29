"""Planning parts on their own: trajectory geometry, the open-loop metric's two definitions, the head and its
losses, and the ego-status baseline."""

from __future__ import annotations

import math

import pytest
import torch

from zoo.bev import EgoStatusMLP, PlanningHead, PlanningMetric
from zoo.bev.control import pure_pursuit
from zoo.bev.planner import CONFLICT_TIMES, collision_loss, pad_agents, planning_losses, route_features
from zoo.bev.trajectory import (
    boxes_overlap,
    constant_velocity_plan,
    ego_boxes,
    route_coordinates,
    waypoint_headings,
)  # fmt: skip


def test_constant_velocity_plans():
    straight = constant_velocity_plan(torch.tensor([4.0]))
    assert torch.allclose(straight[0, :, 0], torch.arange(1.0, 7.0) * 2.0) and not straight[0, :, 1].any()
    # a quarter circle of radius 10 m at 5 m/s takes pi s: the turn-rate plan stays on the circle
    turn = constant_velocity_plan(torch.tensor([5.0, 0.0]), torch.tensor([0.5, 0.3]))
    centre = torch.tensor([0.0, 10.0])
    assert torch.allclose(
        torch.linalg.vector_norm(turn[0] - centre, dim=-1), torch.full((6,), 10.0), atol=1e-5
    )
    assert not turn[1].any()  # standing still, whatever the yaw rate


def test_route_coordinates_follow_the_arc_the_ego_drives():
    speed, yaw_rate = (
        torch.tensor([5.0, 5.0, 5.0]),
        torch.tensor([0.25, -0.25, 0.0]),
    )  # radius 20 m, left/right
    on_route = constant_velocity_plan(speed, yaw_rate)
    along, offset, heading = route_coordinates(on_route, speed, yaw_rate)
    assert torch.allclose(along, torch.arange(1.0, 7.0).expand(3, 6) * 2.5, atol=1e-4)
    assert offset.abs().max() < 1e-4
    assert torch.allclose(heading, along * (yaw_rate / speed)[:, None])
    # 1 m to the left of the route (towards the left turn's centre, away from the right turn's)
    left = on_route + torch.stack([-torch.sin(heading), torch.cos(heading)], -1)
    assert torch.allclose(route_coordinates(left, speed, yaw_rate)[1], torch.ones(3, 6), atol=1e-4)


def test_route_features_tell_an_obstacle_from_traffic_that_clears_the_way():
    """A car stopped in the lane stays on the route while the gap to the ego closes at its speed; a pedestrian
    walking towards the route reaches it; a car driving ahead at the ego's speed keeps its gap."""
    status = torch.zeros(1, 11)
    status[0, 8] = 5.0  # straight on at 5 m/s
    motion = torch.tensor([[[20.0, 0.0, 0.0, 0.0], [15.0, -3.0, 0.0, 1.0], [10.0, 0.0, 5.0, 0.0]]])
    features = route_features(motion, status)[0]
    gaps, offsets = features[:, 0:-3:3] * 10, features[:, 1:-3:3] * 2
    times = torch.tensor(CONFLICT_TIMES)
    assert torch.allclose(gaps[0], 20.0 - 5.0 * times) and not offsets[0].any()
    assert torch.allclose(offsets[1], -3.0 + times) and offsets[1, 3] == 0
    assert torch.allclose(gaps[2], torch.full_like(times, 10.0))
    assert features[1, -1] > 0 and features[0, -1] == 0  # closing in on the route


def test_box_overlap_is_exact_for_rotated_boxes():
    ego = torch.tensor([0.0, 0.0, 2.0, 4.0, 0.0])  # x in [-2, 2], y in [-1, 1]
    cases = {
        (2.6, 0.0, 1.0, 1.0, 0.0): False,  # 0.1 m ahead of the bumper
        (2.4, 0.0, 1.0, 1.0, 0.0): True,
        (2.5, 1.7, 1.0, 1.0, math.pi / 4): False,  # a diamond off the corner: axis-aligned boxes would touch
        (0.0, 1.6, 1.0, 4.0, math.pi / 2): True,  # across, overlapping the side
    }
    for box, expected in cases.items():
        assert bool(boxes_overlap(ego, torch.tensor(box))) is expected, box


def test_headings_follow_the_trajectory_and_hold_when_stopped():
    path = torch.tensor([[[1.0, 0.0], [2.0, 1.0], [2.0, 1.0], [2.0, 2.0]]])
    assert torch.allclose(
        waypoint_headings(path)[0], torch.tensor([0.0, math.pi / 4, math.pi / 4, math.pi / 2])
    )
    assert ego_boxes(path).shape == (1, 4, 5)


def agents_ahead(x: float = 10.0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One parked car ``x`` metres ahead, for every one of the 6 steps."""
    return [torch.tensor([[x, 0.0, 1.9, 4.5, 0.0]]).repeat(6, 1)[None]], [torch.ones(1, 6)]


def test_metric_l2_at_and_averaged_and_the_reactive_subset():
    metric = PlanningMetric()
    target = torch.zeros(2, 6, 2)
    pred = torch.zeros(2, 6, 2)
    pred[0, :, 1] = torch.arange(1.0, 7.0)  # sample 0: error k at waypoint k; sample 1 exact
    far = [torch.zeros(0, 6, 5)] * 2
    metric.update(pred, target, torch.ones(2, 6), far, [torch.zeros(0, 6)] * 2, torch.tensor([True, False]))
    out = metric.compute()
    assert out["plan_L2_1s"] == pytest.approx(1.0) and out["plan_L2_3s"] == pytest.approx(3.0)  # UniAD: at
    assert out["plan_L2_avg_1s"] == pytest.approx(0.75) and out["plan_L2_avg_3s"] == pytest.approx(
        1.75
    )  # VAD
    assert out["plan_L2"] == pytest.approx(2.0) and out["plan_reactive_L2_3s"] == pytest.approx(6.0)
    assert out["plan_col_3s"] == 0


def test_metric_collisions_leave_out_steps_where_the_ground_truth_collides():
    metric = PlanningMetric()
    drive = constant_velocity_plan(torch.tensor([5.0]))  # overlaps the car 12 m ahead from 2 s (10 m) on
    stop = torch.tensor([[2.0, 0.0]]).repeat(6, 1)[None]
    boxes, masks = agents_ahead(12.0)
    metric.update(drive, stop, torch.ones(1, 6), boxes, masks, torch.tensor([True]))
    out = metric.compute()
    assert out["plan_col_1s"] == 0 and out["plan_col_2s"] == 1 and out["plan_col_3s"] == 1
    assert out["plan_col_avg_1s"] == 0 and out["plan_col_avg_2s"] == pytest.approx(0.25)
    assert out["plan_col_avg_3s"] == pytest.approx(0.5) and out["plan_reactive_col_3s"] == 1
    excluded = PlanningMetric()  # the same, but the ground truth drives into the car too: nothing counted
    excluded.update(drive, drive, torch.ones(1, 6), boxes, masks, torch.tensor([False]))
    assert math.isnan(excluded.compute()["plan_col_3s"])


def test_collision_loss_is_zero_when_clear_and_pushes_back_when_close():
    boxes, masks = pad_agents(*agents_ahead())
    clear = torch.tensor([[2.0, 0.0]]).repeat(6, 1)[None]
    assert collision_loss(clear, boxes, masks) == 0
    close = clear.clone().requires_grad_(True)
    with torch.no_grad():
        close[:, :, 0] = 6.0
    loss = collision_loss(close, boxes, masks)
    loss.backward()
    assert loss > 0 and (close.grad[..., 0] > 0).all()  # lowering x (backing off) lowers the loss


def test_planning_losses_mask_invalid_waypoints():
    batch = {"ego_fut": torch.zeros(1, 6, 2), "ego_fut_mask": torch.tensor([[1.0, 1, 1, 1, 0, 0]])}
    batch["agent_fut"], batch["agent_fut_mask"] = [torch.zeros(0, 6, 5)], [torch.zeros(0, 6)]
    pred = torch.zeros(1, 6, 2)
    pred[0, 4:] = 100.0
    losses = planning_losses(pred, batch)
    assert losses["loss_plan_l1"] == 0 and losses["loss_plan_col"] == 0


def test_the_waypoint_loss_is_l1_far_from_the_target_and_fades_near_it():
    """Far off, every sample pulls with L1's unit gradient; within ``l1_beta`` the pull shrinks with the error,
    so the many samples already on the constant-velocity prior stop drowning the few that must react."""
    batch = {"ego_fut": torch.zeros(1, 6, 2), "ego_fut_mask": torch.ones(1, 6)}
    batch["agent_fut"], batch["agent_fut_mask"] = [torch.zeros(0, 6, 5)], [torch.zeros(0, 6)]
    for error, beta, loss, grad in ((3.0, 1.0, 2.5, 1.0), (0.1, 1.0, 0.005, 0.1), (0.1, 0.0, 0.1, 1.0)):
        pred = torch.zeros(1, 6, 2)
        pred[..., 0] = error
        pred.requires_grad_(True)
        value = planning_losses(pred, batch, l1_beta=beta)["loss_plan_l1"]
        value.backward()
        assert value.item() == pytest.approx(loss)
        assert pred.grad[0, 0, 0].item() * 6 == pytest.approx(grad)


def test_the_head_reads_the_agents_velocities():
    """A pedestrian about to cross is told from one standing by its velocity alone."""
    torch.manual_seed(0)
    head = PlanningHead(32, (8, 8), (-25.6, -25.6, -1.0, 25.6, 25.6, 4.0), num_heads=2)
    torch.nn.init.normal_(head.ego.trajectory[-1].weight, std=0.1)
    motion = torch.zeros(1, 10, 4)
    moving = motion.clone()
    moving[0, 3, 2:] = torch.tensor([0.0, -1.2])
    inputs = (torch.randn(1, 64, 32), torch.randn(1, 10, 32))
    rest = (torch.rand(1, 10), torch.zeros(1, 11), torch.tensor([2]))
    assert not torch.allclose(head(*inputs, motion, *rest), head(*inputs, moving, *rest))


def test_untrained_heads_plan_constant_velocity_and_yaw_rate_per_command():
    status = torch.zeros(3, 11)
    status[:, 8], status[:, 9] = 5.0, torch.tensor([0.0, 0.2, -0.2])
    command = torch.tensor([2, 1, 0])
    expected = constant_velocity_plan(status[:, 8], status[:, 9])
    assert torch.allclose(EgoStatusMLP()(status, command), expected)
    head = PlanningHead(32, (8, 8), (-25.6, -25.6, -1.0, 25.6, 25.6, 4.0), num_heads=2)
    plan = head(torch.randn(3, 64, 32), torch.randn(3, 10, 32), torch.randn(3, 10, 4), torch.rand(3, 10), status,
                command)  # fmt: skip
    assert torch.allclose(plan, expected)


def test_the_head_reads_the_bev_and_the_command():
    torch.manual_seed(0)
    head = PlanningHead(32, (8, 8), (-25.6, -25.6, -1.0, 25.6, 25.6, 4.0), num_heads=2)
    torch.nn.init.normal_(head.ego.trajectory[-1].weight, std=0.1)
    status, agents = torch.zeros(1, 11), (torch.randn(1, 10, 32), torch.randn(1, 10, 4), torch.rand(1, 10))
    bev = torch.randn(1, 64, 32, requires_grad=True)
    straight = head(bev, *agents, status, torch.tensor([2]))
    straight.sum().backward()
    assert bev.grad.abs().sum() > 0
    assert not torch.allclose(straight, head(bev, *agents, status, torch.tensor([1])))


def test_pure_pursuit_steers_onto_an_arc_and_reads_the_braking():
    speed = torch.tensor([5.0, 5.0, 4.0])
    arc = constant_velocity_plan(speed[:2], torch.tensor([0.25, -0.25]))  # radius 20 m, left and right
    braking = torch.zeros(1, 6, 2)
    t = torch.arange(1.0, 7.0) * 0.5
    braking[0, :, 0] = torch.where(t < 2.0, 4.0 * t - t**2, torch.tensor(4.0))  # 2 m/s^2 until it stops
    steer, accel = pure_pursuit(torch.cat([arc, braking]), speed)
    assert torch.allclose(steer[:2], torch.tensor([1.0, -1.0]) * math.atan(2.85 / 20.0), atol=1e-5)
    assert steer[2] == 0 and accel[2].item() == pytest.approx(-2.0)
    assert accel[:2].abs().max() < 0.02  # cruising: only the chord of the arc is shorter than the path
