"""Predict records: nuScenes submission boxes from the head's 9-value boxes, and the top-down picture."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from zoo.bev.head import decode_boxes, encode_boxes
from zoo.bev.records import CLASS_COLOURS, box_to_submission, draw_top_down, rotation_to_quaternion
from zoo.datamodules.bev import pose_matrix


def yaw_pose(yaw: float, translation=(0.0, 0.0, 0.0)) -> np.ndarray:
    return pose_matrix([math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)], translation)


def from_submission(entry: dict, lidar2global: np.ndarray) -> list[float]:
    """The inverse of ``box_to_submission`` for poses that turn about z only (nuScenes' ego poses, nearly)."""
    rotation, offset = lidar2global[:3, :3], lidar2global[:3, 3]
    x, y, z = rotation.T @ (np.asarray(entry["translation"]) - offset)
    heading = rotation.T @ pose_matrix(entry["rotation"], (0, 0, 0))[:3, :3]
    vx, vy, _ = rotation.T @ [*entry["velocity"], 0.0]
    return [x, y, z, *entry["size"], math.atan2(heading[1, 0], heading[0, 0]), vx, vy]


def test_the_head_boxes_round_trip_through_the_submission_format():
    generator = torch.Generator().manual_seed(0)
    boxes = torch.cat(
        [
            torch.rand(16, 3, generator=generator) * 40 - 20,
            torch.rand(16, 3, generator=generator) * 4 + 0.3,
            torch.rand(16, 1, generator=generator) * 2 * math.pi - math.pi,
            torch.randn(16, 2, generator=generator) * 3,
        ],
        -1,
    ).double()
    decoded = decode_boxes(encode_boxes(boxes))  # the layout the head decodes
    for pose in (np.eye(4), yaw_pose(2.5, (600.0, 1600.0, 1.8)), yaw_pose(-3.0, (-40.0, 7.0, 0.0))):
        for box in decoded:
            entry = box_to_submission(box.tolist(), pose)
            assert set(entry) == {"translation", "size", "rotation", "velocity"}
            assert np.allclose(from_submission(entry, pose), box.numpy(), atol=1e-9)


def test_submission_conventions_by_hand():
    # a 2 m wide, 4.5 m long, 1.6 m high car 10 m ahead, heading left (+y), driving 3 m/s that way
    box = [10.0, 0.0, 0.8, 2.0, 4.5, 1.6, math.pi / 2, 0.0, 3.0]
    entry = box_to_submission(box)
    assert entry["translation"] == pytest.approx([10.0, 0.0, 0.8])
    assert entry["size"] == [2.0, 4.5, 1.6]  # nuScenes' w, l, h
    assert entry["rotation"] == pytest.approx([math.cos(math.pi / 4), 0.0, 0.0, math.sin(math.pi / 4)])
    assert entry["velocity"] == pytest.approx([0.0, 3.0])
    # the ego at (100, 200) heading +y in the global frame: ahead is +y, the car's heading -x
    entry = box_to_submission(box, yaw_pose(math.pi / 2, (100.0, 200.0, 0.5)))
    assert entry["translation"] == pytest.approx([100.0, 210.0, 1.3])
    assert entry["rotation"] == pytest.approx([0.0, 0.0, 0.0, 1.0], abs=1e-12)  # yaw pi
    assert entry["velocity"] == pytest.approx([-3.0, 0.0])


def test_rotation_to_quaternion_inverts_pose_matrix_in_every_branch():
    rng = np.random.default_rng(0)
    quaternions = [*rng.normal(size=(64, 4)), [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    for q in quaternions:
        q = np.asarray(q, dtype=float) / np.linalg.norm(q)
        q = q if q[0] >= 0 else -q
        assert np.allclose(rotation_to_quaternion(pose_matrix(q, (0, 0, 0))[:3, :3]), q, atol=1e-12)


def test_top_down_shows_predictions_filled_and_ground_truth_outlined():
    names = ["car", "pedestrian"]
    pc_range = (-20.0, -20.0, -1.0, 20.0, 20.0, 3.0)
    ahead = np.array([[12.0, 0.0, 0.8, 2.0, 4.0, 1.6, 0.0, 0.0, 0.0]])  # a car 12 m ahead
    left = np.array([[0.0, 12.0, 0.9, 3.0, 3.0, 1.8, 0.0, 0.0, 0.0]])  # a pedestrian-sized square 12 m left
    image = draw_top_down(ahead, [0], [1.0], left, [1], names, pc_range, size=200)
    assert image.size == (200, 200) and image.mode == "RGB"
    pixels = np.asarray(image)
    # forward is up, left is left (5 px a metre): the car (rows 30-50, columns 95-105) is filled in its colour
    assert tuple(pixels[45, 100]) == CLASS_COLOURS["car"]
    # the ground truth is outlined (edge at y = 13.5 m) in the darkened pedestrian colour, its inside white
    assert tuple(pixels[100, 32]) == tuple(v // 2 for v in CLASS_COLOURS["pedestrian"])
    assert tuple(pixels[102, 42]) == (255, 255, 255)
    faint = np.asarray(draw_top_down(ahead, [0], [0.1], left[:0], [], names, pc_range, size=200))
    assert (faint[45, 100] > pixels[45, 100]).all()  # opacity follows the score
