"""The planning scenes: the ego's past is plain constant velocity until an obstacle on its route, which only the
cameras show, makes it brake; the planning fields follow nuScenes' conventions, also from VAD-style info files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from zoo.bev.planning_metrics import collisions
from zoo.bev.trajectory import constant_velocity_plan
from zoo.datamodules import BEVDetectionDataModule
from zoo.datamodules.bev import PLANNING_FIELDS, NuScenesInfoDataset, SyntheticSceneDataset, collate_bev
from zoo.datamodules.bev_scenes import BRAKE_DECEL, BRAKE_WINDOW, COMMANDS, make_planning_scene

from .test_data import write_fixture

CLASSES = ("car", "truck", "bus", "pedestrian", "barrier")


def scenes(count: int = 40, reactive: float = 0.5):
    return [make_planning_scene(np.random.default_rng([0, k]), CLASSES, num_frames=8, num_objects=20, radius=32,
                                reactive=reactive) for k in range(count)]  # fmt: skip


def test_the_ego_cruises_until_it_brakes_for_an_obstacle_on_its_route():
    drawn = scenes()
    reacting = [s for s in drawn if s.obstacle >= 0]
    assert 10 < len(reacting) < 30  # about half
    for scene in drawn:
        speeds = scene.track_speed
        cruising = np.arange(len(speeds)) * scene.dt - scene.past * scene.dt < scene.brake_time
        assert np.allclose(speeds[cruising], scene.ego_speed)  # constant velocity before the reaction
        if scene.obstacle < 0:
            assert np.allclose(speeds, scene.ego_speed)
            continue
        # it brakes only after the last rendered frame, within BRAKE_WINDOW, decelerating at BRAKE_DECEL
        last = (scene.num_frames - 1) * scene.dt
        assert last <= scene.brake_time <= last + BRAKE_WINDOW
        assert speeds[-1] < speeds[0] and np.diff(speeds).min() >= -BRAKE_DECEL * scene.dt - 1e-9
        # the obstacle stands ahead of where the ego stops (its last point plus the rest of the braking), on
        # its route, and is one of the scene's boxes; a pedestrian crosses, so only its lateral place changes
        obstacle_now = scene.start_xy[scene.obstacle] + scene.velocity[scene.obstacle] * (
            (len(speeds) - scene.past - 1) * scene.dt
        )
        heading = np.array([np.cos(scene.track_yaw[-1]), np.sin(scene.track_yaw[-1])])
        ahead = (obstacle_now - scene.track_xy[-1]) @ heading - speeds[-1] ** 2 / (2 * BRAKE_DECEL)
        assert 2.0 + 2.0 - 0.2 < ahead < 2.0 + 2.0 + 6.5  # ego half length + gap + obstacle half extent


def test_items_carry_the_planning_fields_and_the_reactive_flag():
    data = SyntheticSceneDataset("val", num_scenes=6, frames_per_scene=8, queue_length=1, img_size=(32, 56),
                                 num_objects=20, planning=True)  # fmt: skip
    items = [data[i] for i in range(len(data))]
    batch = collate_bev(items)
    assert batch["ego_fut"].shape == (48, 6, 2) and batch["ego_status"].shape == (48, 11)
    assert batch["ego_command"].dtype == torch.long and set(batch["ego_command"].tolist()) <= {0, 1, 2}
    assert len(batch["agent_fut"]) == 48 and batch["agent_fut"][0].shape[1:] == (6, 5)
    status = batch["ego_status"]
    cv = constant_velocity_plan(status[:, 8], status[:, 9])
    error = torch.linalg.vector_norm(batch["ego_fut"] - cv, dim=-1).amax(-1)
    assert torch.equal(batch["reactive"], error > 1.0)
    assert 0 < batch["reactive"].sum() < 48
    assert error[~batch["reactive"]].max() < 1.0
    # the ground truth never collides; constant velocity does, in reactive samples only
    assert not collisions(batch["ego_fut"], batch["agent_fut"], batch["agent_fut_mask"]).any()
    hits = collisions(cv, batch["agent_fut"], batch["agent_fut_mask"]).any(-1)
    assert hits.any() and not hits[~batch["reactive"]].any()
    # the past of a sample is in its own ego frame: the last past position is one step behind
    speed = status[:, 8]
    behind = torch.linalg.vector_norm(status[:, 6:8], dim=-1)
    cruising = status[:, 10] == 0
    assert torch.allclose(behind[cruising], speed[cruising] * 0.5, atol=1e-2)  # a chord of the arc


def test_reactive_samples_have_a_constant_velocity_past():
    """The ego-status shortcut must fail: no key frame is already braking, yet some futures deviate."""
    data = SyntheticSceneDataset("train", num_scenes=8, frames_per_scene=8, queue_length=1, img_size=(32, 56),
                                 num_objects=10, planning=True)  # fmt: skip
    batch = collate_bev([data[i] for i in range(len(data))])
    assert torch.all(batch["ego_status"][:, 10] == 0)  # zero acceleration everywhere
    assert batch["reactive"].sum() >= 4


def test_commands_follow_the_route_not_the_reaction():
    for scene in scenes(20):
        commands = {scene.command(f) for f in range(scene.num_frames)}
        assert len(commands) == 1
        (command,) = commands
        if abs(scene.curvature) < 0.004:
            assert COMMANDS[command] == "straight"


def test_detection_data_is_unchanged_and_has_no_planning_fields():
    item = SyntheticSceneDataset("train", num_scenes=1, frames_per_scene=2, img_size=(32, 56), num_objects=8)[
        1
    ]
    assert not set(PLANNING_FIELDS) & set(item)
    module = BEVDetectionDataModule(planning=True, train_scenes=1, val_scenes=1, test_scenes=1, frames_per_scene=2,
                                    img_size=(32, 56), num_objects=8, batch_size=2)  # fmt: skip
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert set(PLANNING_FIELDS) <= set(batch)


def test_info_files_with_vad_planning_fields(tmp_path):
    write_fixture(tmp_path)
    infos = json.loads((tmp_path / "infos.json").read_text())
    for n, info in enumerate(infos["infos"]):
        info["gt_ego_fut_trajs"] = [[2.0, 0.1]] * 6  # VAD: per-step displacements
        info["gt_ego_fut_masks"] = [1, 1, 1, 1, 1, 0]
        info["gt_ego_fut_cmd"] = [0, 1, 0]
        info["gt_agent_fut_trajs"] = [[1.0, 0.0] * 6, [0.0, 0.0] * 6, [0.0, 0.0] * 6]
        info["gt_agent_fut_masks"] = [[1] * 6, [1] * 6, [0] * 6]
        info["ego2global_translation"] = [600.0 + 3.0 * n, 1600.0, 0.0]
    (tmp_path / "plan.json").write_text(json.dumps(infos))
    kwargs = {
        "class_names": ("car",),
        "point_cloud_range": (-51.2, -51.2, -5, 51.2, 51.2, 3),
        "img_size": (45, 80),
    }
    item = NuScenesInfoDataset(tmp_path / "plan.json", tmp_path, planning=True, **kwargs)[1]
    assert torch.allclose(item["ego_fut"][-1], torch.tensor([12.0, 0.6]))
    assert item["ego_fut_mask"].tolist() == [1, 1, 1, 1, 1, 0] and item["ego_command"].item() == 1
    assert item["ego_status"][8].item() == pytest.approx(1.0) and item["ego_status"][
        10
    ].item() == pytest.approx(1.0)
    # the previous sample 3 m behind along the global x axis, seen from this one's LiDAR frame (heading 30 deg)
    assert torch.linalg.vector_norm(item["ego_status"][6:8]).item() == pytest.approx(3.0, abs=1e-4)
    assert item["agent_fut"].shape == (1, 6, 5)  # the in-range car only
    assert torch.allclose(item["agent_fut"][0, :, 0], 5.0 + torch.arange(1.0, 7.0))
    with pytest.raises(ValueError, match="gt_ego_fut_trajs"):
        NuScenesInfoDataset(tmp_path / "infos.json", tmp_path, planning=True, **kwargs)
