"""The BEV data: deterministic synthetic scenes consistent with their own calibration, nuScenes info files,
and clear errors for bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from zoo.bev import BEVFormerDetector
from zoo.cli import linked_model_arguments
from zoo.datamodules.bev import (
    BEVDetectionDataModule,
    NuScenesInfoDataset,
    SyntheticSceneDataset,
    collate_bev,
    pose_matrix,
)
from zoo.datamodules.bev_scenes import CAMERA_NAMES, nuscenes_rig, render_frame

SMALL = {"num_scenes": 2, "frames_per_scene": 3, "queue_length": 2, "img_size": (32, 56), "num_objects": 12}


def test_scenes_are_deterministic_and_split_dependent():
    a, b = SyntheticSceneDataset("train", **SMALL), SyntheticSceneDataset("train", **SMALL)
    c = SyntheticSceneDataset("val", **SMALL)
    x, y, z = a[4], b[4], c[4]
    assert torch.equal(x["images"], y["images"]) and torch.equal(x["gt_boxes"], y["gt_boxes"])
    assert not torch.equal(x["images"], z["images"])
    assert x["images"].shape == (2, 6, 3, 32, 56) and x["lidar2img"].shape == (2, 6, 4, 4)
    assert x["gt_boxes"].shape[1] == 9 and len(x["gt_labels"]) == len(x["gt_boxes"]) > 0


def test_queue_and_can_bus_follow_the_ego_poses():
    data = SyntheticSceneDataset("train", **SMALL)
    first, later = data[0], data[2]
    assert first["prev_exists"].tolist() == [False, False]  # padded at the scene start, nothing continues
    assert later["prev_exists"].tolist() == [False, True]
    assert torch.equal(first["can_bus"][:, :3], torch.zeros(2, 3))
    cur, prev = later["can_bus"][1], later["can_bus"][0]
    # the yaw change in degrees equals the difference of the absolute yaws
    assert cur[17].item() == pytest.approx(math.degrees(cur[16] - prev[16]), abs=1e-3)
    speed = math.hypot(cur[0], cur[1]) / 0.5
    assert speed == pytest.approx(cur[13].item(), rel=0.05, abs=0.05)  # 2 Hz key frames


def test_items_carry_their_token_and_pose():
    data = SyntheticSceneDataset("test", **SMALL)
    first, item = data[3], data[4]  # scene 1, frames 0 and 1
    assert item["token"] == "test_scene001_frame01"
    pose = item["lidar2global"]
    assert pose.shape == (4, 4) and pose.dtype == torch.float64
    # the key frame's ego translation since the previous frame is the difference of the two poses
    assert torch.allclose(item["can_bus"][-1, :3].double(), (pose - first["lidar2global"])[:3, 3], atol=1e-5)
    batch = collate_bev([first, item])
    assert batch["token"] == ["test_scene001_frame00", "test_scene001_frame01"]
    assert batch["lidar2global"].shape == (2, 4, 4)


def test_ground_truth_is_filtered_and_counted():
    data = SyntheticSceneDataset("train", **SMALL)
    for i in range(len(data)):
        boxes = data[i]["gt_boxes"]
        assert (boxes[:, :2].abs() <= 25.6).all()
    counts = data.filter_counts
    assert counts["kept"] > 0 and counts["outside_range"] > 0
    assert set(counts) <= {"kept", "outside_range", "not_visible"}


def test_lidar2img_and_renderer_agree():
    """A car 15 m ahead is drawn where lidar2img projects its centre, in CAM_FRONT only."""
    rig = nuscenes_rig((64, 112))
    car = np.array([[15.0, 0.0, 0.85, 1.9, 4.5, 1.7, 0.3, 0.0, 0.0]])
    colour = np.array([[1.0, 0.0, 0.0]])
    with_car, pixels = render_frame(rig, car, colour, np.eye(4))
    empty, _ = render_frame(rig, car[:0], colour[:0], np.eye(4))
    point = rig.lidar2img[0] @ np.array([15.0, 0.0, 0.85, 1.0])
    u, v = int(point[0] / point[2]), int(point[1] / point[2])
    assert 0 <= u < 112 and 0 <= v < 64
    assert with_car[0, v, u, 0] > 1.5 * with_car[0, v, u, 2]  # red, not sky or ground
    changed = (with_car != empty).any(-1).any(-1).any(-1)
    assert changed.tolist() == [True, False, False, False, False, False]
    assert pixels[0] == (with_car != empty).any(-1).sum()


def test_datamodule_batches_and_links():
    dm = BEVDetectionDataModule(batch_size=3, train_scenes=1, val_scenes=1, test_scenes=1, frames_per_scene=3,
                                img_size=(32, 56), num_objects=8)  # fmt: skip
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["images"].shape == (3, 3, 6, 3, 32, 56)
    assert isinstance(batch["gt_boxes"], list) and len(batch["gt_boxes"]) == 3
    assert dm.num_classes == 5 and dm.point_cloud_range == [-25.6, -25.6, -1.0, 25.6, 25.6, 4.0]
    assert linked_model_arguments(dm, BEVFormerDetector) == {
        "class_names": ["car", "truck", "bus", "pedestrian", "barrier"],
        "point_cloud_range": [-25.6, -25.6, -1.0, 25.6, 25.6, 4.0],
    }
    dm.setup("predict")  # without predict_info: the test split
    assert dm.predict_dataloader().dataset is dm.test_set


def test_bad_synthetic_arguments():
    with pytest.raises(ValueError, match="no synthetic style"):
        SyntheticSceneDataset("train", class_names=("car", "spaceship"))
    with pytest.raises(ValueError, match="point_cloud_range"):
        SyntheticSceneDataset("train", point_cloud_range=(1, 2, 3))
    with pytest.raises(ValueError, match="split"):
        SyntheticSceneDataset("training")
    with pytest.raises(ValueError, match="img_size"):
        BEVDetectionDataModule(img_size=(8, 8))
    with pytest.raises(ValueError, match="val_info"):
        BEVDetectionDataModule(data_root="somewhere", train_info="a.json").setup("fit")
    with pytest.raises(ValueError, match="predict_info is relative to data_root"):
        BEVDetectionDataModule(predict_info="infos.json")


# ------------------------------------------------------------------------------ nuScenes info files
#: the LiDAR 0.9 m ahead of the ego centre, 1.8 m up; the ego at (600, 1600) m heading 30 degrees
POSES = {
    "lidar2ego_rotation": [1.0, 0.0, 0.0, 0.0], "lidar2ego_translation": [0.9, 0.0, 1.8],
    "ego2global_rotation": [math.cos(math.pi / 12), 0.0, 0.0, math.sin(math.pi / 12)],
    "ego2global_translation": [600.0, 1600.0, 0.0],
}  # fmt: skip


def write_fixture(root, samples=2):
    """A tiny nuScenes-format info file (BEVFormer converter fields) and its camera images."""
    rig = nuscenes_rig((90, 160))  # small images keep the test fast; intrinsics match them
    infos = []
    for s in range(samples):
        cams = {}
        for n, name in enumerate(CAMERA_NAMES):
            path = f"samples/{name}/{s}.png"
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((90, 160, 3), 40 * n, dtype=np.uint8)).save(root / path)
            cams[name] = {
                "data_path": path,
                "cam_intrinsic": rig.intrinsics[n].tolist(),
                "sensor2lidar_rotation": rig.cam2ego[n, :3, :3].tolist(),
                "sensor2lidar_translation": rig.cam2ego[n, :3, 3].tolist(),
            }
        infos.append({
            "token": f"t{s}", "scene_token": "scene-0", "can_bus": [float(s)] * 16 + [0.1 * s, 5.0 * s], "cams": cams,
            "gt_boxes": [[5, 1, 0.8, 1.9, 4.5, 1.6, 0.2], [80, 0, 0, 2, 4, 1.5, 0], [3, 3, 0, 1, 1, 1, 0]],
            "gt_names": ["car", "car", "ignore"], "gt_velocity": [[1, 0], [0, 0], [float("nan"), 0]],
            "valid_flag": [True, True, True], **POSES,
        })  # fmt: skip
    (root / "infos.json").write_text(json.dumps({"infos": infos}))
    return rig


def test_nuscenes_info_files_load(tmp_path):
    rig = write_fixture(tmp_path)
    data = NuScenesInfoDataset(tmp_path / "infos.json", tmp_path, class_names=("car", "pedestrian"),
                               point_cloud_range=(-51.2, -51.2, -5, 51.2, 51.2, 3), img_size=(45, 80), queue_length=2)  # fmt: skip
    item = data[1]
    assert item["images"].shape == (2, 6, 3, 45, 80)
    expected = np.diag([0.5, 0.5, 1, 1]) @ rig.lidar2img  # BEVFormer's formula, rescaled to 80 x 45
    assert np.allclose(item["lidar2img"][1].numpy(), expected, atol=1e-3)
    assert item["prev_exists"].tolist() == [False, True]
    assert item["can_bus"][1, 0].item() == pytest.approx(1.0) and item["can_bus"][
        1, 17
    ].item() == pytest.approx(5.0)
    assert item["gt_boxes"].shape == (1, 9) and item["gt_labels"].tolist() == [0]
    assert data.filter_counts["outside_range"] == 1 and data.filter_counts["unknown_class"] == 1
    assert len(collate_bev([data[0], data[1]])["gt_boxes"]) == 2


def test_nuscenes_info_errors_name_the_field(tmp_path):
    write_fixture(tmp_path)
    kwargs = {
        "class_names": ("car",),
        "point_cloud_range": (-51.2, -51.2, -5, 51.2, 51.2, 3),
        "img_size": (45, 80),
    }
    with pytest.raises(FileNotFoundError, match="does not exist"):
        NuScenesInfoDataset(tmp_path / "nope.json", tmp_path, **kwargs)
    infos = json.loads((tmp_path / "infos.json").read_text())
    infos["infos"][1]["cams"]["CAM_BACK"]["cam_intrinsic"] = [[1, 0], [0, 1]]
    (tmp_path / "bad.json").write_text(json.dumps(infos))
    with pytest.raises(ValueError, match=r"infos\[1\]\.cams\.CAM_BACK\.cam_intrinsic has shape \(2, 2\)"):
        NuScenesInfoDataset(tmp_path / "bad.json", tmp_path, **kwargs)
    (tmp_path / "samples/CAM_FRONT/0.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"infos\[0\]\.cams\.CAM_FRONT: image .* is missing"):
        NuScenesInfoDataset(tmp_path / "infos.json", tmp_path, **kwargs)


def test_info_poses_and_an_unannotated_predict_file(tmp_path):
    write_fixture(tmp_path)
    infos = json.loads((tmp_path / "infos.json").read_text())
    for info in infos["infos"]:
        del info["gt_boxes"], info["gt_names"], info["gt_velocity"], info["valid_flag"]
    (tmp_path / "test_infos.json").write_text(json.dumps(infos))
    kwargs = {
        "class_names": ("car",),
        "point_cloud_range": (-51.2, -51.2, -5, 51.2, 51.2, 3),
        "img_size": (45, 80),
    }
    with pytest.raises(ValueError, match=r"infos\[0\] has no 'gt_boxes'"):
        NuScenesInfoDataset(tmp_path / "test_infos.json", tmp_path, **kwargs)
    dm = BEVDetectionDataModule(batch_size=2, img_size=(45, 80), queue_length=2, data_root=str(tmp_path),
                                predict_info="test_infos.json")  # fmt: skip
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["token"] == ["t0", "t1"] and [len(b) for b in batch["gt_boxes"]] == [0, 0]
    ego2global = pose_matrix(POSES["ego2global_rotation"], POSES["ego2global_translation"])
    lidar2ego = pose_matrix(POSES["lidar2ego_rotation"], POSES["lidar2ego_translation"])
    assert torch.allclose(batch["lidar2global"][0], torch.from_numpy(ego2global @ lidar2ego))
    lidar_position = [600 + 0.9 * math.cos(math.pi / 6), 1600 + 0.9 * math.sin(math.pi / 6), 1.8]
    assert batch["lidar2global"][0, :3, 3].tolist() == pytest.approx(lidar_position)
    infos["infos"][1]["ego2global_translation"] = [1.0, 2.0]
    (tmp_path / "bad.json").write_text(json.dumps(infos))
    with pytest.raises(ValueError, match=r"infos\[1\]\.ego2global_translation must have 3 values"):
        NuScenesInfoDataset(tmp_path / "bad.json", tmp_path, annotated=False, **kwargs)
