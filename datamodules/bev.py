"""Multi-camera 3D detection data: embedded synthetic driving scenes, or nuScenes-format info files.

Each item is one key frame with the ``queue_length - 1`` frames before it (BEVFormer's temporal queue):

- ``images`` (T, N, 3, H, W) float, ImageNet-normalised; ``lidar2img`` (T, N, 4, 4);
- ``can_bus`` (T, 18) in nuScenes' layout after BEVFormer's conversion: ``[0:3]`` the ego translation
  since the previous frame (global frame), ``[3:7]`` the ego rotation quaternion (w, x, y, z),
  ``[10:13]`` rotation rate, ``[13:16]`` velocity, ``[16]`` absolute yaw (rad), ``[17]`` the yaw change since
  the previous frame (degrees); deltas are zero on a scene's first frame;
- ``prev_exists`` (T,) bool: whether entry t continues entry t-1 (False at t = 0 and where the queue was
  padded at a scene start by repeating its first frame);
- ``gt_boxes`` (M, 9) ``x, y, z, w, l, h, yaw, vx, vy`` of the last frame (LiDAR frame, gravity centre; the
  LiDAR frame is the ego frame in the synthetic scenes), ``gt_labels`` (M,), ``gt_attributes`` (M,) nuScenes
  attribute index or -1;
- ``token`` (str): the sample token of an info file, ``<split>_scene<k>_frame<f>`` for a synthetic frame;
  ``lidar2global`` (4, 4) float64: the pose of the boxes' frame in the global frame (the synthetic scene's
  world), which nuScenes submissions are written in.

With ``planning=True`` (embedded scenes where the ego reacts to obstacles, or info files with VAD's planning
fields) each item also has, in the key frame's LiDAR/ego frame:

- ``ego_fut`` (6, 2) the ego's positions 0.5 ... 3 s ahead, ``ego_fut_mask`` (6,) which of them exist;
- ``ego_command`` () long, index into ``COMMANDS`` (VAD's order: right, left, straight), from the route;
- ``ego_status`` (11,) ``EGO_STATUS_DIMS``: 4 past positions (oldest first), speed, yaw rate, acceleration;
- ``agent_fut`` (K, 6, 5) every agent's box ``x, y, w, l, yaw`` at those times, ``agent_fut_mask`` (K, 6);
- ``reactive`` () bool: the future leaves constant velocity and yaw rate by more than 1 m
  (``zoo.bev.trajectory.deviates_from_constant_velocity``). In the embedded scenes every key frame has a
  constant-velocity past (the ego starts braking only after a scene's last rendered frame), so a reactive
  sample is one whose future deviates while its past does not: only the cameras can tell it.

Ground truth is filtered as nuScenes and BEVFormer filter it, with the counts kept in ``filter_counts``:
boxes whose centre lies outside the BEV range are dropped (as ``ObjectRangeFilter``), and so are boxes that
no camera sees (fewer than ``min_pixels`` rendered pixels; nuScenes drops boxes without lidar points).

``BEVRequestCodec`` (``BEVDetectionDataModule.request_codec()``) reads a ``zoo serve`` request, one sample
with its cameras, CAN bus and earlier frames, into such an item, as the info files are read.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from zoo.bev.trajectory import EGO_STATUS_DIMS, deviates_from_constant_velocity
from zoo.datamodules.bev_scenes import (
    CAMERA_NAMES,
    CLASS_STYLE,
    COMMANDS,
    PlanningScene,
    make_planning_scene,
    make_scene,
    nuscenes_rig,
    render_frame,
)
from zoo.datamodules.splits import SplitDataModule
from zoo.errors import MissingFileError, ZooError
from zoo.resume import ResumableDataLoader
from zoo.serving import RequestCodec, RequestError, image_field, text_field

__all__ = [
    "PLANNING_FIELDS",
    "BEVDetectionDataModule",
    "BEVRequestCodec",
    "NuScenesInfoDataset",
    "SyntheticSceneDataset",
    "can_bus_vector",
    "collate_bev",
    "lidar2img_from_calibration",
    "pose_matrix",
    "resize_camera",
]

SPLITS = {"train": 0, "val": 1, "test": 2}
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
DEFAULT_CLASSES = ("car", "truck", "bus", "pedestrian", "barrier")


def can_bus_vector(
    ego2global: np.ndarray, prev_ego2global: np.ndarray | None, yaw_rate: float, speed: float
) -> np.ndarray:
    """The 18 CAN-bus floats BEVFormer feeds its model, from two ego poses (4 x 4, yaw about z)."""
    yaw = math.atan2(ego2global[1, 0], ego2global[0, 0])
    vec = np.zeros(18)
    vec[3:7] = [math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)]
    vec[10:13] = [0.0, 0.0, yaw_rate]
    vec[13:16] = [speed, 0.0, 0.0]
    vec[16] = yaw
    if prev_ego2global is not None:
        prev_yaw = math.atan2(prev_ego2global[1, 0], prev_ego2global[0, 0])
        vec[0:3] = ego2global[:3, 3] - prev_ego2global[:3, 3]
        vec[17] = math.degrees((yaw - prev_yaw + math.pi) % (2 * math.pi) - math.pi)
    return vec


def pose_matrix(rotation: Sequence[float], translation: Sequence[float]) -> np.ndarray:
    """(4, 4) pose from a quaternion ``[w, x, y, z]`` and a translation, as nuScenes stores poses."""
    w, x, y, z = np.asarray(rotation, dtype=np.float64) / np.linalg.norm(rotation)
    pose = np.eye(4)
    pose[:3, :3] = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ]
    pose[:3, 3] = translation
    return pose


def lidar2img_from_calibration(intrinsic, sensor2lidar_rotation, sensor2lidar_translation) -> np.ndarray:
    """BEVFormer's ``lidar2img`` (4, 4, float64) from an info file's camera entry: ``K_pad @ lidar2cam``,
    with ``lidar2cam = [R^T | -R^T t]`` for the camera-to-lidar pose (R, t)."""
    rotation = np.asarray(sensor2lidar_rotation, dtype=np.float64)
    translation = np.asarray(sensor2lidar_translation, dtype=np.float64)
    lidar2cam = np.eye(4)
    lidar2cam[:3, :3] = rotation.T
    lidar2cam[:3, 3] = -rotation.T @ translation
    view = np.eye(4)
    view[:3, :3] = np.asarray(intrinsic, dtype=np.float64)
    return view @ lidar2cam


def resize_camera(image, lidar2img: np.ndarray, img_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A camera's ``PIL`` image resized (bilinear) to ``img_size`` (H, W) as a (H, W, 3) uint8 array, and its
    ``lidar2img`` (for the image as given) scaled to the resized pixels. An image of that size is unchanged."""
    from PIL import Image

    height, width = img_size
    scale = np.diag([width / image.width, height / image.height, 1.0, 1.0])
    resized = image.convert("RGB").resize((width, height), Image.BILINEAR)
    return np.asarray(resized), scale @ lidar2img


def _normalise(images: np.ndarray) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> (..., 3, H, W) float, ImageNet mean/std."""
    tensor = torch.from_numpy(images).float().div_(255).movedim(-1, -3)
    return (tensor - IMAGENET_MEAN) / IMAGENET_STD


def _queue_indices(frame: int, queue_length: int) -> list[int]:
    return [max(frame - k, 0) for k in range(queue_length - 1, -1, -1)]


def _check_range(point_cloud_range) -> tuple[float, ...]:
    values = tuple(float(v) for v in point_cloud_range)
    if len(values) != 6 or not all(values[i] < values[i + 3] for i in range(3)):
        raise ZooError(
            f"point_cloud_range must be [x_min, y_min, z_min, x_max, y_max, z_max] with min < max, got {values}"
        )
    return values


def _in_range(boxes: np.ndarray, pc_range: tuple[float, ...]) -> np.ndarray:
    return (
        (boxes[:, 0] >= pc_range[0])
        & (boxes[:, 0] <= pc_range[3])
        & (boxes[:, 1] >= pc_range[1])
        & (boxes[:, 1] <= pc_range[4])
    )


#: The planning entries of an item (``planning=True``).
PLANNING_FIELDS = (
    "ego_fut",
    "ego_fut_mask",
    "ego_command",
    "ego_status",
    "agent_fut",
    "agent_fut_mask",
    "reactive",
)
#: Planning horizon (waypoints at 2 Hz) and ego history length, as in nuScenes planning.
FUTURE_STEPS, PAST_STEPS, PLAN_DT = 6, 4, 0.5


def _planning_item(
    ego_fut: np.ndarray, ego_fut_mask: np.ndarray, command: int, past: np.ndarray, speed: float,
    yaw_rate: float, acceleration: float, agent_fut: np.ndarray, agent_fut_mask: np.ndarray,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """The planning fields as tensors, with ``reactive`` derived from the future and the ego's motion."""
    fut = torch.from_numpy(np.asarray(ego_fut, dtype=np.float32).reshape(FUTURE_STEPS, 2))
    mask = torch.from_numpy(np.asarray(ego_fut_mask, dtype=np.float32).reshape(FUTURE_STEPS))
    status = np.concatenate([np.asarray(past, dtype=np.float64).reshape(-1), [speed, yaw_rate, acceleration]])
    reactive = deviates_from_constant_velocity(
        fut[None], torch.tensor([speed], dtype=torch.float32), torch.tensor([yaw_rate], dtype=torch.float32),
        mask[None], dt=PLAN_DT,
    )[0]  # fmt: skip
    return {
        "ego_fut": fut,
        "ego_fut_mask": mask,
        "ego_command": torch.tensor(int(command)),
        "ego_status": torch.from_numpy(status).float().reshape(EGO_STATUS_DIMS),
        "agent_fut": torch.from_numpy(np.asarray(agent_fut, dtype=np.float32).reshape(-1, FUTURE_STEPS, 5)),
        "agent_fut_mask": torch.from_numpy(
            np.asarray(agent_fut_mask, dtype=np.float32).reshape(-1, FUTURE_STEPS)
        ),
        "reactive": reactive,
    }


def _scene_planning_fields(scene: PlanningScene, frame: int) -> dict[str, torch.Tensor]:
    """An embedded scene's planning fields at ``frame``; every agent counts for collisions, seen or not."""
    agents = scene.agent_futures(frame)
    return _planning_item(
        scene.ego_points(frame, range(1, FUTURE_STEPS + 1)), np.ones(FUTURE_STEPS), scene.command(frame),
        scene.ego_points(frame, range(-PAST_STEPS, 0)), scene.speed(frame), scene.yaw_rate(frame),
        scene.acceleration(frame), agents, np.ones(agents.shape[:2]),
    )  # fmt: skip


class SyntheticSceneDataset(Dataset):
    """Key frames of ``num_scenes`` deterministic scenes; each scene is rendered once, on first use, and cached.

    Scene ``k`` depends only on ``(seed, split, k)``, so the data are the same on every machine and rank.
    ``planning=True`` draws scenes in which the ego brakes for an obstacle (a fraction ``reactive`` of them;
    ``make_planning_scene``) and adds the planning fields to each item.
    """

    def __init__(
        self,
        split: str = "train",
        *,
        seed: int = 0,
        num_scenes: int = 8,
        frames_per_scene: int = 8,
        queue_length: int = 3,
        img_size: tuple[int, int] = (64, 112),
        class_names: tuple[str, ...] = DEFAULT_CLASSES,
        num_objects: int = 30,
        point_cloud_range: tuple[float, ...] = (-25.6, -25.6, -1.0, 25.6, 25.6, 4.0),
        min_pixels: int = 4,
        noise: float = 0.02,
        planning: bool = False,
        reactive: float = 0.5,
    ) -> None:
        if split not in SPLITS:
            raise ZooError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        unknown = [c for c in class_names if c not in CLASS_STYLE]
        if unknown:
            raise ZooError(f"class_names {unknown} have no synthetic style; choose from {tuple(CLASS_STYLE)}")
        if queue_length < 1 or frames_per_scene < 1 or num_scenes < 1:
            raise ZooError("queue_length, frames_per_scene and num_scenes must all be >= 1")
        self.split, self.seed = split, seed
        self.num_scenes, self.frames_per_scene, self.queue_length = num_scenes, frames_per_scene, queue_length
        self.class_names = tuple(class_names)
        self.num_objects, self.min_pixels, self.noise = num_objects, min_pixels, noise
        self.planning, self.reactive = planning, reactive
        self.pc_range = _check_range(point_cloud_range)
        self.rig = nuscenes_rig(tuple(img_size))
        self.lidar2img = torch.from_numpy(self.rig.lidar2img).float()
        self.filter_counts: Counter = Counter()
        self._cache: dict[int, dict] = {}

    def __len__(self) -> int:
        return self.num_scenes * self.frames_per_scene

    def scene(self, index: int) -> dict:
        """Render (once) every frame of scene ``index``: images, boxes, labels, can_bus."""
        if index in self._cache:
            return self._cache[index]
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
        x_extent = min(abs(self.pc_range[0]), self.pc_range[3], abs(self.pc_range[1]), self.pc_range[4])
        sizes = {
            "num_frames": self.frames_per_scene,
            "num_objects": self.num_objects,
            "radius": 1.25 * x_extent,
        }
        if self.planning:
            scene = make_planning_scene(
                rng, self.class_names, reactive=self.reactive, past=PAST_STEPS, future=FUTURE_STEPS, dt=PLAN_DT,
                **sizes,
            )  # fmt: skip
        else:
            scene = make_scene(rng, self.class_names, **sizes)
        colours = np.array([CLASS_STYLE[self.class_names[c]][1] for c in scene.classes]) / 255.0
        colours = np.clip(colours * rng.uniform(0.85, 1.1, size=(len(colours), 1)), 0, 1).reshape(-1, 3)
        attributes = scene.attributes()
        frames = []
        for frame in range(scene.num_frames):
            boxes = scene.boxes(frame)
            pose = scene.ego2global(frame)
            noise = rng.normal(0.0, self.noise, size=(len(self.rig.names) * np.prod(self.rig.img_size), 3))
            images, pixels = render_frame(self.rig, boxes, colours, pose, noise=noise)
            seen = pixels >= self.min_pixels
            inside = _in_range(boxes, self.pc_range)
            self.filter_counts["kept"] += int((seen & inside).sum())
            self.filter_counts["outside_range"] += int((~inside).sum())
            self.filter_counts["not_visible"] += int((inside & ~seen).sum())
            keep = seen & inside
            prev = scene.ego2global(frame - 1) if frame > 0 else None
            speed, yaw_rate = scene.ego_speed, scene.ego_yaw_rate
            if isinstance(scene, PlanningScene):
                speed, yaw_rate = scene.speed(frame), scene.yaw_rate(frame)
            frames.append(
                {
                    "images": images,
                    "gt_boxes": torch.from_numpy(boxes[keep]).float(),
                    "gt_labels": torch.from_numpy(scene.classes[keep]),
                    "gt_attributes": torch.from_numpy(attributes[keep]),
                    "can_bus": torch.from_numpy(can_bus_vector(pose, prev, yaw_rate, speed)).float(),
                    "lidar2global": torch.from_numpy(pose),
                    **(_scene_planning_fields(scene, frame) if isinstance(scene, PlanningScene) else {}),
                }
            )
        self._cache[index] = {"frames": frames}
        return self._cache[index]

    def __getitem__(self, index: int) -> dict:
        scene_index, frame = divmod(index, self.frames_per_scene)
        frames = self.scene(scene_index)["frames"]
        queue = _queue_indices(frame, self.queue_length)
        last = frames[frame]
        prev_exists = torch.tensor([t > 0 and queue[t] != queue[t - 1] for t in range(len(queue))])
        can_bus = torch.stack([frames[i]["can_bus"] for i in queue])
        can_bus[~prev_exists, 0:3] = 0.0  # BEVFormer zeroes the deltas where no previous BEV is used
        can_bus[~prev_exists, 17] = 0.0
        return {
            "images": _normalise(np.stack([frames[i]["images"] for i in queue])),
            "lidar2img": self.lidar2img.expand(len(queue), -1, -1, -1).clone(),
            "can_bus": can_bus,
            "prev_exists": prev_exists,
            "gt_boxes": last["gt_boxes"],
            "gt_labels": last["gt_labels"],
            "gt_attributes": last["gt_attributes"],
            "sample_id": index,
            "token": f"{self.split}_scene{scene_index:03d}_frame{frame:02d}",
            "lidar2global": last["lidar2global"],
            **{key: last[key] for key in PLANNING_FIELDS if key in last},
        }


class NuScenesInfoDataset(Dataset):
    """Key frames listed in a nuScenes-format info file (JSON), images read from ``data_root``.

    The file holds ``{"infos": [...]}`` as BEVFormer's converter writes them (saved as JSON rather than
    pickle, so nothing executable is loaded): per sample ``token``, ``scene_token``, ``can_bus`` (18),
    ``cams`` (camera name -> ``data_path``, ``cam_intrinsic`` 3 x 3, ``sensor2lidar_rotation`` 3 x 3,
    ``sensor2lidar_translation`` 3), ``gt_boxes`` (M x 7: x, y, z, w, l, h, yaw in the LiDAR frame, geometric
    centre), ``gt_names``, ``gt_velocity`` (M x 2), optional ``valid_flag``, and the poses
    ``lidar2ego_rotation``/``_translation`` and ``ego2global_rotation``/``_translation`` (quaternion
    ``[w, x, y, z]``, metres; without an ego pose ``lidar2global`` is the identity, and predictions stay in the
    LiDAR frame). Boxes of unknown class, without ``valid_flag`` or outside the BEV range are dropped, counted in
    ``filter_counts``; samples are ordered by their position in the file, and the temporal queue stays within
    a ``scene_token``. ``annotated=False`` accepts samples without ``gt_boxes``/``gt_names`` (nuScenes' test
    split), which then have no ground truth.

    ``planning=True`` reads VAD's planning fields too: ``gt_ego_fut_trajs`` (6 x 2 displacements per 0.5 s step,
    LiDAR frame), ``gt_ego_fut_masks`` (6), ``gt_ego_fut_cmd`` (one-hot: right, left, straight) and, for
    collisions, ``gt_agent_fut_trajs`` (M x 12 displacements) with ``gt_agent_fut_masks`` (M x 6) for the
    ``gt_boxes`` (no agents without them). The ego status comes from the CAN bus (speed ``[13]``, yaw rate
    ``[12]``, acceleration ``[7]``) and the poses of the scene's earlier samples (the oldest repeats at a start).
    """

    def __init__(
        self,
        info_file: str | Path,
        data_root: str | Path,
        *,
        class_names: tuple[str, ...],
        point_cloud_range: tuple[float, ...],
        img_size: tuple[int, int],
        queue_length: int = 3,
        cameras: tuple[str, ...] = CAMERA_NAMES,
        annotated: bool = True,
        planning: bool = False,
    ) -> None:
        self.info_file, self.data_root, self.annotated = Path(info_file), Path(data_root), annotated
        self.planning = planning
        if not self.info_file.is_file():
            raise MissingFileError(f"info file {str(self.info_file)!r} does not exist")
        try:
            infos = json.loads(self.info_file.read_text())["infos"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ZooError(
                f"{self.info_file}: expected a JSON object with an 'infos' list ({error})"
            ) from error
        self.class_names, self.cameras = tuple(class_names), tuple(cameras)
        self.pc_range, self.img_size, self.queue_length = (
            _check_range(point_cloud_range),
            img_size,
            queue_length,
        )
        self.filter_counts: Counter = Counter()
        self.infos = [self._validate(i, info) for i, info in enumerate(infos)]

    def _validate(self, index: int, info: dict) -> dict:
        where = f"{self.info_file}: infos[{index}]"
        required = (
            ("token", "scene_token", "can_bus", "cams")
            + (("gt_boxes", "gt_names") if self.annotated else ())
            + (("gt_ego_fut_trajs", "gt_ego_fut_masks", "gt_ego_fut_cmd") if self.planning else ())
        )
        for key in required:
            if key not in info:
                raise ZooError(f"{where} has no {key!r}")
        for frame in ("lidar2ego", "ego2global"):
            fields = {f"{frame}_rotation": 4, f"{frame}_translation": 3}
            if not any(key in info for key in fields):
                continue
            for key, size in fields.items():
                if np.asarray(info.get(key, ())).shape != (size,):
                    raise ZooError(f"{where}.{key} must have {size} values (a pose needs both fields)")
        if len(info["can_bus"]) != 18:
            raise ZooError(f"{where}.can_bus has {len(info['can_bus'])} values, expected 18")
        for cam in self.cameras:
            if cam not in info["cams"]:
                raise ZooError(f"{where}.cams has no {cam!r} (cameras present: {sorted(info['cams'])})")
            entry = info["cams"][cam]
            for key, shape in (("cam_intrinsic", (3, 3)), ("sensor2lidar_rotation", (3, 3))):
                if np.asarray(entry[key]).shape != shape:
                    raise ZooError(
                        f"{where}.cams.{cam}.{key} has shape {np.asarray(entry[key]).shape}, expected {shape}"
                    )
            if np.asarray(entry["sensor2lidar_translation"]).shape != (3,):
                raise ZooError(f"{where}.cams.{cam}.sensor2lidar_translation must have 3 values")
            path = self.data_root / entry["data_path"]
            if not path.is_file():
                raise MissingFileError(f"{where}.cams.{cam}: image {str(path)!r} is missing")
        if self.planning:
            for key, shape in (("gt_ego_fut_trajs", (FUTURE_STEPS, 2)), ("gt_ego_fut_masks", (FUTURE_STEPS,)),
                               ("gt_ego_fut_cmd", (len(COMMANDS),))):  # fmt: skip
                if np.asarray(info[key]).shape != shape:
                    raise ZooError(f"{where}.{key} has shape {np.asarray(info[key]).shape}, expected {shape}")
        boxes = np.asarray(info.get("gt_boxes", []), dtype=np.float64).reshape(-1, 7)
        if len(info.get("gt_names", [])) != len(boxes):
            raise ZooError(f"{where}: {len(boxes)} gt_boxes but {len(info.get('gt_names', []))} gt_names")
        return info

    def __len__(self) -> int:
        return len(self.infos)

    @staticmethod
    def _lidar2global(info: dict) -> np.ndarray:
        """``ego2global @ lidar2ego`` (without lidar2ego the LiDAR frame is the ego's); no ego pose: identity."""
        if "ego2global_rotation" not in info:
            return np.eye(4)
        pose = pose_matrix(info["ego2global_rotation"], info["ego2global_translation"])
        if "lidar2ego_rotation" in info:
            pose = pose @ pose_matrix(info["lidar2ego_rotation"], info["lidar2ego_translation"])
        return pose

    def _lidar2img(self, info: dict) -> np.ndarray:
        """Every camera's ``lidar2img`` for its image as stored (``lidar2img_from_calibration``)."""
        cams = info["cams"]
        return np.stack(
            [
                lidar2img_from_calibration(
                    cams[cam]["cam_intrinsic"],
                    cams[cam]["sensor2lidar_rotation"],
                    cams[cam]["sensor2lidar_translation"],
                )
                for cam in self.cameras
            ]
        )

    def _frame(self, info: dict) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        images, mats = [], self._lidar2img(info)
        for n, cam in enumerate(self.cameras):
            with Image.open(self.data_root / info["cams"][cam]["data_path"]) as img:
                image, mats[n] = resize_camera(img, mats[n], self.img_size)
                images.append(image)
        return _normalise(np.stack(images)), torch.from_numpy(mats).float()

    def __getitem__(self, index: int) -> dict:
        info = self.infos[index]
        queue = [index]
        while len(queue) < self.queue_length:
            prev = queue[0] - 1
            queue.insert(
                0, prev if prev >= 0 and self.infos[prev]["scene_token"] == info["scene_token"] else queue[0]
            )
        frames = [self._frame(self.infos[i]) for i in queue]
        prev_exists = torch.tensor([t > 0 and queue[t] != queue[t - 1] for t in range(len(queue))])
        can_bus = torch.tensor(np.stack([self._can_bus(i) for i in queue]), dtype=torch.float32)
        can_bus[~prev_exists, 0:3] = 0.0
        can_bus[~prev_exists, 17] = 0.0
        boxes, labels = self._targets(info)
        return {
            "images": torch.stack([f[0] for f in frames]),
            "lidar2img": torch.stack([f[1] for f in frames]),
            "can_bus": can_bus,
            "prev_exists": prev_exists,
            "gt_boxes": boxes,
            "gt_labels": labels,
            "gt_attributes": torch.full((len(labels),), -1, dtype=torch.long),
            "sample_id": index,
            "token": str(info["token"]),
            "lidar2global": torch.from_numpy(self._lidar2global(info)),
            **(self._planning(index) if self.planning else {}),
        }

    def _planning(self, index: int) -> dict[str, torch.Tensor]:
        info = self.infos[index]
        earlier = [index]
        for _ in range(PAST_STEPS):
            prev = earlier[0] - 1
            same = prev >= 0 and self.infos[prev]["scene_token"] == info["scene_token"]
            earlier.insert(0, prev if same else earlier[0])
        to_here = np.linalg.inv(self._lidar2global(info))
        past = np.stack([(to_here @ self._lidar2global(self.infos[i]))[:2, 3] for i in earlier[:-1]])
        can_bus = np.asarray(info["can_bus"], dtype=np.float64)
        keep = self._keep(info)
        boxes = np.asarray(info.get("gt_boxes", []), dtype=np.float64).reshape(-1, 7)[keep]
        steps = np.asarray(
            info.get("gt_agent_fut_trajs", np.zeros((len(keep), 2 * FUTURE_STEPS))), dtype=np.float64
        )
        steps = steps.reshape(-1, FUTURE_STEPS, 2)[keep]
        masks = np.asarray(
            info.get("gt_agent_fut_masks", np.zeros((len(keep), FUTURE_STEPS))), dtype=np.float64
        )
        centres = boxes[:, None, :2] + np.cumsum(steps, axis=1)
        sizes = np.broadcast_to(boxes[:, None, [3, 4, 6]], (len(boxes), FUTURE_STEPS, 3))
        return _planning_item(
            np.cumsum(np.asarray(info["gt_ego_fut_trajs"], dtype=np.float64), axis=0), info["gt_ego_fut_masks"],
            int(np.argmax(info["gt_ego_fut_cmd"])), past, can_bus[13], can_bus[12], can_bus[7],
            np.concatenate([centres, sizes], axis=-1), masks.reshape(-1, FUTURE_STEPS)[keep],
        )  # fmt: skip

    def _keep(self, info: dict) -> np.ndarray:
        """Which of the info's boxes are targets: a known class, valid, inside the BEV range."""
        boxes = np.asarray(info.get("gt_boxes", []), dtype=np.float64).reshape(-1, 7)
        known = np.array([name in self.class_names for name in info.get("gt_names", [])], dtype=bool)
        valid = np.asarray(info.get("valid_flag", np.ones(len(boxes), dtype=bool)), dtype=bool)
        return known.reshape(-1) & valid & _in_range(boxes, self.pc_range)

    def _can_bus(self, index: int) -> np.ndarray:
        """Deltas to the previous sample of the same scene, as BEVFormer's ``union2one`` makes them."""
        vec = np.asarray(self.infos[index]["can_bus"], dtype=np.float64).copy()
        if index > 0 and self.infos[index - 1]["scene_token"] == self.infos[index]["scene_token"]:
            prev = np.asarray(self.infos[index - 1]["can_bus"], dtype=np.float64)
            vec[0:3] -= prev[0:3]
            vec[17] -= prev[17]
        return vec

    def _targets(self, info: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if "gt_boxes" not in info:  # an unannotated sample (validated with annotated=False)
            return torch.zeros(0, 9), torch.zeros(0, dtype=torch.long)
        boxes = np.asarray(info["gt_boxes"], dtype=np.float64).reshape(-1, 7)
        velocity = np.asarray(info.get("gt_velocity", np.zeros((len(boxes), 2))), dtype=np.float64).reshape(
            -1, 2
        )
        velocity = np.nan_to_num(velocity)
        known = np.array([name in self.class_names for name in info["gt_names"]], dtype=bool)
        valid = np.asarray(info.get("valid_flag", np.ones(len(boxes), dtype=bool)), dtype=bool)
        inside = _in_range(boxes, self.pc_range)
        self.filter_counts["unknown_class"] += int((~known).sum())
        self.filter_counts["invalid"] += int((known & ~valid).sum())
        self.filter_counts["outside_range"] += int((known & valid & ~inside).sum())
        keep = known & valid & inside
        self.filter_counts["kept"] += int(keep.sum())
        labels = [self.class_names.index(n) for n, k in zip(info["gt_names"], keep) if k]
        out = np.concatenate([boxes[keep], velocity[keep]], axis=1)
        return torch.from_numpy(out).float(), torch.tensor(labels, dtype=torch.long)


def collate_bev(items: list[dict]) -> dict:
    """Stack the camera tensors and poses (and the ego's planning fields); ground truth (a count per sample)
    and tokens stay lists."""
    batch = {
        key: torch.stack([item[key] for item in items])
        for key in ("images", "lidar2img", "can_bus", "prev_exists", "lidar2global")
    }
    for key in ("gt_boxes", "gt_labels", "gt_attributes", "token"):
        batch[key] = [item[key] for item in items]
    batch["sample_id"] = torch.tensor([item["sample_id"] for item in items])
    if all("ego_fut" in item for item in items):  # planning fields: agents (a count per sample) stay lists
        for key in PLANNING_FIELDS:
            values = [item[key] for item in items]
            batch[key] = values if key.startswith("agent_") else torch.stack(values)
    return batch


class BEVRequestCodec(RequestCodec):
    """``zoo serve`` requests for BEVFormer: one sample, its cameras' images and calibration, its CAN bus, and
    optionally the frames before it (the temporal queue), read as ``NuScenesInfoDataset`` reads info files.

    A request (JSON; the images as base64 PNG or JPEG, since a camera's pixels as nested arrays would be
    megabytes of text)::

        {"id": "sample token (optional)",
         "cameras": {"CAM_FRONT": {"image": "<base64>", "lidar2img": [[4 x 4]]},
                     "CAM_FRONT_RIGHT": {"image": "<base64>", "cam_intrinsic": [[3 x 3]],
                                         "sensor2lidar_rotation": [[3 x 3]], "sensor2lidar_translation": [3]},
                     ...every camera of the data, by name},
         "can_bus": [18 numbers],
         "previous": [{"cameras": {...}, "can_bus": [...]}, ...],
         "lidar2global": [[4 x 4]]}

    - ``lidar2img`` maps LiDAR points to the pixels of the image as sent; or give an info file's calibration,
      from which BEVFormer's formula makes it. Every image is resized (bilinear) to the data's ``img_size``
      and ImageNet-normalised, and its matrix scaled with it, as the info loader does;
    - ``can_bus`` is an info file's: ``[0:3]`` the ego position in the global frame and ``[17]`` its heading in
      degrees, which become the deltas to the previous frame (zero where there is none), as the loader and
      BEVFormer's test loop make them; the other values pass as they are;
    - ``previous``: the frames before this one, oldest first, at most ``queue_length - 1``; fewer are padded
      at the front as a scene start is (no previous BEV there);
    - ``lidar2global`` (optional): the pose the boxes are moved by into the global frame, or the info file's
      ``ego2global_rotation``/``_translation`` (and ``lidar2ego_*``); without them the boxes stay in the
      LiDAR frame.

    ``parse`` gives an item of the predict data set (no ground truth, ``sample_id`` -1); ``collate`` is
    ``collate_bev``, so ``predict_step`` reads a served batch as it reads a loader's.
    """

    fields = {
        "cameras": "one entry per camera name: {image: base64, lidar2img: 4x4} or an info file's calibration",
        "can_bus": "18 numbers as in nuScenes info files (global position, heading in degrees at [17])",
        "previous": "optional list of earlier frames {cameras, can_bus}, oldest first",
        "lidar2global": "optional 4x4 pose of the LiDAR frame in the global frame",
        "ego2global_rotation": "optional quaternion [w, x, y, z] (instead of lidar2global)",
        "ego2global_translation": "optional [x, y, z] (with ego2global_rotation)",
        "lidar2ego_rotation": "optional quaternion [w, x, y, z] (with the ego pose)",
        "lidar2ego_translation": "optional [x, y, z] (with lidar2ego_rotation)",
        "id": "optional sample token, echoed in the answer",
    }
    frame_fields = ("cameras", "can_bus")
    calibration = {"cam_intrinsic": (3, 3), "sensor2lidar_rotation": (3, 3), "sensor2lidar_translation": (3,)}

    def __init__(self, img_size: tuple[int, int], queue_length: int, cameras: Sequence[str] = CAMERA_NAMES):
        self.img_size = tuple(int(v) for v in img_size)
        self.queue_length = int(queue_length)
        self.cameras = tuple(cameras)

    def parse(self, payload) -> dict:
        payload = self.check_keys(payload)
        token = text_field(payload, "id", required=False, default="request", max_length=1000)
        previous = payload.get("previous", [])
        if not isinstance(previous, list):
            raise RequestError("previous", f"expected a list of frames, got {type(previous).__name__}")
        if len(previous) >= self.queue_length:
            held = f"{self.queue_length - 1} before the current one (queue_length {self.queue_length})"
            raise RequestError("previous", f"{len(previous)} frames, but this model's queue holds {held}")
        for n, frame in enumerate(previous):
            _known_keys(frame, f"previous[{n}]", self.frame_fields)
        frames = [self._frame(f, f"previous[{n}].") for n, f in enumerate(previous)]
        frames.append(self._frame(payload, ""))
        # the loader's queue: padded at the front by repeating the first frame, which has no previous BEV
        queue = [0] * (self.queue_length - len(frames)) + list(range(len(frames)))
        prev_exists = torch.tensor([t > 0 and queue[t] != queue[t - 1] for t in range(len(queue))])
        vectors = [frames[0][2]] + [_can_bus_deltas(cur[2], prev[2]) for prev, cur in pairwise(frames)]
        can_bus = torch.tensor(np.stack([vectors[i] for i in queue]), dtype=torch.float32)
        can_bus[~prev_exists, 0:3] = 0.0
        can_bus[~prev_exists, 17] = 0.0
        return {
            "images": torch.stack([frames[i][0] for i in queue]),
            "lidar2img": torch.stack([frames[i][1] for i in queue]),
            "can_bus": can_bus,
            "prev_exists": prev_exists,
            "gt_boxes": torch.zeros(0, 9),
            "gt_labels": torch.zeros(0, dtype=torch.long),
            "gt_attributes": torch.zeros(0, dtype=torch.long),
            "sample_id": -1,
            "token": token,
            "lidar2global": torch.from_numpy(self._lidar2global(payload)),
        }

    def collate(self, items) -> dict:
        return collate_bev(list(items))

    def _frame(self, frame, prefix: str) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """(images (N, 3, H, W) normalised, lidar2img (N, 4, 4) for them, the raw CAN bus (18,))."""
        cameras = frame.get("cameras")
        seen = f"this model sees {len(self.cameras)} cameras: {', '.join(self.cameras)}"
        if cameras is None:
            raise RequestError(f"{prefix}cameras", f"missing; {seen}")
        cameras = _known_keys(cameras, f"{prefix}cameras", self.cameras, what="camera")
        images, mats = [], []
        for name in self.cameras:
            where = f"{prefix}cameras.{name}"
            if name not in cameras:
                raise RequestError(where, f"missing; {seen}")
            entry = _known_keys(cameras[name], where, ("image", "lidar2img", *self.calibration))
            image = image_field({f"{where}.image": entry.get("image")}, f"{where}.image")
            pixels, lidar2img = resize_camera(image, self._lidar2img(entry, where), self.img_size)
            images.append(pixels)
            mats.append(lidar2img)
        can_bus = _array(frame.get("can_bus"), f"{prefix}can_bus", (18,))
        return _normalise(np.stack(images)), torch.from_numpy(np.stack(mats)).float(), can_bus

    def _lidar2img(self, entry, where: str) -> np.ndarray:
        given = [key for key in self.calibration if key in entry]
        if "lidar2img" in entry:
            if given:
                raise RequestError(f"{where}.{given[0]}", "give lidar2img or the calibration, not both")
            return _array(entry["lidar2img"], f"{where}.lidar2img", (4, 4))
        if not given:
            raise RequestError(f"{where}.lidar2img", f"missing (or give {', '.join(self.calibration)})")
        values = [_array(entry.get(key), f"{where}.{key}", shape) for key, shape in self.calibration.items()]
        return lidar2img_from_calibration(*values)

    def _lidar2global(self, payload) -> np.ndarray:
        poses = [key for key in self.fields if key.startswith(("ego2global_", "lidar2ego_"))]
        given = [key for key in poses if key in payload]
        if "lidar2global" in payload:
            if given:
                raise RequestError(given[0], "give lidar2global or the ego and LiDAR poses, not both")
            return _array(payload["lidar2global"], "lidar2global", (4, 4))
        info = {}
        for frame in ("ego2global", "lidar2ego"):
            fields = {f"{frame}_rotation": (4,), f"{frame}_translation": (3,)}
            if any(key in payload for key in fields):
                for key, shape in fields.items():
                    info[key] = _array(payload.get(key), key, shape)
        if info and "ego2global_rotation" not in info:
            raise RequestError("ego2global_rotation", "missing (the LiDAR pose is relative to the ego's)")
        if "ego2global_rotation" in info and not np.linalg.norm(info["ego2global_rotation"]):
            raise RequestError("ego2global_rotation", "is a zero quaternion")
        if "lidar2ego_rotation" in info and not np.linalg.norm(info["lidar2ego_rotation"]):
            raise RequestError("lidar2ego_rotation", "is a zero quaternion")
        return NuScenesInfoDataset._lidar2global(info)


def _known_keys(value, where: str, known: Sequence[str], what: str = "field") -> dict:
    """``value`` as an object holding only ``known`` keys (a typo is named rather than ignored)."""
    if not isinstance(value, dict):
        raise RequestError(where, f"expected an object with {', '.join(known)}, got {type(value).__name__}")
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise RequestError(f"{where}.{unknown[0]}", f"unknown {what}; expected some of {', '.join(known)}")
    return value


def _array(value, field: str, shape: tuple[int, ...]) -> np.ndarray:
    """A float64 array of ``shape`` from nested JSON lists of finite numbers."""
    if value is None:
        raise RequestError(field, f"missing ({' x '.join(map(str, shape))} numbers)")
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise RequestError(field, f"expected {' x '.join(map(str, shape))} numbers (nested lists)") from None
    if array.shape != shape:
        raise RequestError(field, f"has shape {array.shape}, expected {shape}")
    if not np.isfinite(array).all():
        raise RequestError(field, "holds a value that is not a finite number")
    return array


def _can_bus_deltas(vector: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """``vector`` with translation and heading as deltas to ``previous`` (``NuScenesInfoDataset._can_bus``)."""
    vector = vector.copy()
    vector[0:3] -= previous[0:3]
    vector[17] -= previous[17]
    return vector


class BEVDetectionDataModule(SplitDataModule):
    """Synthetic driving scenes by default; nuScenes-format info files when ``data_root`` is given.

    Args:
        class_names: detection classes (label = index); linked into the model by the CLI.
        point_cloud_range: BEV range ``[x_min, y_min, z_min, x_max, y_max, z_max]`` (metres, ego frame);
            linked into the model.
        img_size: (H, W) of every camera image.
        queue_length: frames per item (the key frame and the ones before it); 1 disables history.
        train_scenes / val_scenes / test_scenes, frames_per_scene, num_objects: synthetic data size.
        data_root, train_info, val_info, test_info: real data (info files relative to ``data_root``).
        predict_info: the info file ``zoo predict`` reads (relative to ``data_root``; annotations optional);
            without it, predict runs on the test split.
        planning: add the ego's planning fields to each item (``ego_fut``, ``ego_command``, ``ego_status``,
            ``agent_fut`` ...): embedded scenes where the ego brakes for obstacles, or info files' VAD fields.
        reactive: fraction of embedded planning scenes with an obstacle on the ego's route.
    """

    #: data attribute -> model argument, fed by ``zoo fit`` into models that take the argument
    model_links: ClassVar[dict[str, str]] = {
        "class_names": "class_names",
        "point_cloud_range": "point_cloud_range",
    }
    predict_set: Dataset | None = None

    def __init__(
        self,
        batch_size: int = 4,
        num_workers: int = 0,
        class_names: list[str] | None = None,
        point_cloud_range: list[float] | None = None,
        img_size: tuple[int, int] = (64, 112),
        queue_length: int = 3,
        train_scenes: int = 48,
        val_scenes: int = 8,
        test_scenes: int = 8,
        frames_per_scene: int = 8,
        num_objects: int = 30,
        seed: int = 0,
        data_root: str | None = None,
        train_info: str | None = None,
        val_info: str | None = None,
        test_info: str | None = None,
        predict_info: str | None = None,
        planning: bool = False,
        reactive: float = 0.5,
    ) -> None:
        super().__init__()
        # class_names / point_cloud_range are linked into the model, whose hyperparameters record them
        self.save_hyperparameters(ignore=["class_names", "point_cloud_range"])
        self.class_names = list(class_names or DEFAULT_CLASSES)
        self.point_cloud_range = list(
            _check_range(point_cloud_range or (-25.6, -25.6, -1.0, 25.6, 25.6, 4.0))
        )
        if len(img_size) != 2 or min(img_size) < 16:
            raise ZooError(f"img_size must be (H, W) with both >= 16, got {img_size}")
        if predict_info is not None and data_root is None:
            raise ZooError("predict_info is relative to data_root: give data_root too")
        self.img_size = tuple(int(v) for v in img_size)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict" and self.hparams.predict_info is not None:
            if self.predict_set is None:
                self.predict_set = self._info_set(self.hparams.predict_info, annotated=False)
            return
        if self.train_set is None:
            self._setup_splits()
        if self.predict_set is None:
            self.predict_set = self.test_set

    def _info_set(self, info: str, annotated: bool = True) -> NuScenesInfoDataset:
        return NuScenesInfoDataset(
            Path(self.hparams.data_root) / info,
            self.hparams.data_root,
            class_names=tuple(self.class_names),
            point_cloud_range=tuple(self.point_cloud_range),
            img_size=self.img_size,
            queue_length=self.hparams.queue_length,
            annotated=annotated,
            planning=self.hparams.planning and annotated,
        )

    def _setup_splits(self) -> None:
        hp = self.hparams
        if hp.data_root is None:
            sizes = {"train": hp.train_scenes, "val": hp.val_scenes, "test": hp.test_scenes}
            sets = {
                split: SyntheticSceneDataset(
                    split,
                    seed=hp.seed,
                    num_scenes=n,
                    frames_per_scene=hp.frames_per_scene,
                    queue_length=hp.queue_length,
                    img_size=self.img_size,
                    class_names=tuple(self.class_names),
                    num_objects=hp.num_objects,
                    point_cloud_range=tuple(self.point_cloud_range),
                    planning=hp.planning,
                    reactive=hp.reactive,
                )
                for split, n in sizes.items()
            }
        else:
            infos = {"train": hp.train_info, "val": hp.val_info, "test": hp.test_info or hp.val_info}
            missing = [k for k in ("train", "val") if infos[k] is None]
            if missing:
                raise ZooError(
                    f"data_root is set, so {', '.join(f'{k}_info' for k in missing)} must be given too"
                )
            sets = {split: self._info_set(path) for split, path in infos.items()}
        self.train_set, self.val_set, self.test_set = sets["train"], sets["val"], sets["test"]

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_set, shuffle=False)

    def request_codec(self) -> BEVRequestCodec:
        """What ``zoo serve`` reads: one sample per request with up to ``queue_length - 1`` earlier frames,
        read as the info files are (images resized to ``img_size``, CAN-bus deltas, the queue padded)."""
        return BEVRequestCodec(self.img_size, self.hparams.queue_length)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return ResumableDataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            seed_samples=shuffle,  # evaluation draws nothing; its loaders keep the dataset itself
            num_workers=self.hparams.num_workers,
            collate_fn=collate_bev,
            persistent_workers=self.hparams.num_workers > 0,
        )
