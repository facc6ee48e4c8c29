"""Synthetic driving scenes for BEV detection: a nuScenes-like camera rig, moving boxes, a ray-cast renderer.

Nothing is downloaded: scene ``k`` of a split is a pure function of ``(seed, split, k)``. An ego vehicle
drives a smooth arc (2 Hz key frames, like nuScenes) among boxes of several classes, some parked, some
moving; six pinhole cameras with nuScenes' layout, intrinsics and mounting positions see the boxes. Every
image is ray-cast (one ray per pixel, vectorised numpy): shaded faces (a fixed sun), class colours, a
lighter front face so heading is visible, depth occlusion, a world-fixed ground texture (so ego motion is
visible) and a sky. 3D must be inferred from 2D: the only depth cues are those of real images (ground
contact height, apparent size, occlusion, parallax between frames).

Frames and conventions (nuScenes / mmdet3d >= 1.0 LiDAR frame, which here coincides with the ego frame):
x forward, y left, z up, metres, origin on the ground under the ego centre. Boxes are
``(x, y, z, w, l, h, yaw, vx, vy)``: ``z`` the gravity centre, ``l`` the extent along the heading, ``w``
across it, ``yaw`` the heading angle from +x towards +y, velocities the object's own (global) velocity
rotated into the ego frame, as nuScenes reports them. ``lidar2img`` = ``K @ ego2cam`` (4 x 4) maps
homogeneous ego points to ``(u d, v d, d, 1)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from zoo.bev.metrics import ATTRIBUTE_NAMES
from zoo.bev.trajectory import EGO_SIZE
from zoo.errors import ZooError

__all__ = [
    "CAMERA_NAMES",
    "CLASS_STYLE",
    "COMMANDS",
    "CameraRig",
    "PlanningScene",
    "Scene",
    "make_planning_scene",
    "make_scene",
    "nuscenes_rig",
    "render_frame",
]

#: nuScenes camera order used by the info files (and hence lidar2img[i]).
CAMERA_NAMES = (
    "CAM_FRONT",
    "CAM_FRONT_RIGHT",
    "CAM_FRONT_LEFT",
    "CAM_BACK",
    "CAM_BACK_LEFT",
    "CAM_BACK_RIGHT",
)

# Rounded nuScenes calibration (1600 x 900 images): (fx, cx, cy), mount (x, y, z) in the ego frame, yaw (deg)
# of the optical axis from +x towards +y. CAM_BACK has the wider lens.
_NUSCENES_CAMERAS = {
    "CAM_FRONT": ((1266.4, 816.3, 491.5), (1.70, 0.02, 1.51), 0.0),
    "CAM_FRONT_RIGHT": ((1260.8, 808.0, 495.3), (1.55, -0.49, 1.50), -55.0),
    "CAM_FRONT_LEFT": ((1272.6, 826.6, 479.8), (1.52, 0.49, 1.51), 55.0),
    "CAM_BACK": ((809.2, 829.2, 481.8), (0.03, 0.00, 1.57), 180.0),
    "CAM_BACK_LEFT": ((1256.7, 817.8, 451.9), (1.04, 0.48, 1.56), 110.0),
    "CAM_BACK_RIGHT": ((1259.5, 807.3, 501.2), (1.05, -0.48, 1.56), -110.0),
}

#: class -> (mean (w, l, h), RGB colour, probability of moving, speed range m/s)
CLASS_STYLE: dict[
    str, tuple[tuple[float, float, float], tuple[int, int, int], float, tuple[float, float]]
] = {
    "car": ((1.95, 4.6, 1.7), (215, 50, 45), 0.6, (2.0, 9.0)),
    "truck": ((2.5, 6.9, 2.8), (50, 90, 225), 0.5, (2.0, 7.0)),
    "bus": ((2.9, 11.0, 3.4), (235, 200, 40), 0.5, (2.0, 7.0)),
    "pedestrian": ((0.7, 0.75, 1.75), (40, 200, 80), 0.7, (0.6, 1.8)),
    "barrier": ((2.5, 0.55, 1.0), (230, 130, 30), 0.0, (0.0, 0.0)),
    "traffic_cone": ((0.45, 0.45, 1.0), (240, 90, 200), 0.0, (0.0, 0.0)),
    "bicycle": ((0.6, 1.7, 1.3), (60, 210, 220), 0.6, (2.0, 5.0)),
    "motorcycle": ((0.8, 2.1, 1.5), (150, 60, 200), 0.6, (3.0, 9.0)),
    "trailer": ((2.9, 12.0, 3.9), (120, 120, 130), 0.3, (2.0, 6.0)),
    "construction_vehicle": ((2.8, 6.4, 3.2), (200, 160, 100), 0.2, (0.5, 2.0)),
}


@dataclass(frozen=True)
class CameraRig:
    """Pinhole cameras: ``intrinsics`` (N, 3, 3) for ``img_size`` (H, W), ``cam2ego`` (N, 4, 4)."""

    names: tuple[str, ...]
    intrinsics: np.ndarray
    cam2ego: np.ndarray
    img_size: tuple[int, int]

    @property
    def lidar2img(self) -> np.ndarray:
        """(N, 4, 4): ego (= lidar) homogeneous points to ``(u d, v d, d, 1)``."""
        view = np.tile(np.eye(4), (len(self.names), 1, 1))
        view[:, :3, :3] = self.intrinsics
        return view @ np.linalg.inv(self.cam2ego)


def nuscenes_rig(img_size: tuple[int, int] = (64, 112), cameras: tuple[str, ...] = CAMERA_NAMES) -> CameraRig:
    """nuScenes' six cameras with intrinsics rescaled from 1600 x 900 to ``img_size`` (H, W)."""
    height, width = img_size
    sx, sy = width / 1600.0, height / 900.0
    intrinsics, cam2ego = [], []
    for name in cameras:
        if name not in _NUSCENES_CAMERAS:
            raise ZooError(f"unknown camera {name!r}; expected some of {CAMERA_NAMES}")
        (f, cx, cy), mount, yaw_deg = _NUSCENES_CAMERAS[name]
        intrinsics.append(np.array([[f * sx, 0, cx * sx], [0, f * sy, cy * sy], [0, 0, 1]]))
        yaw = math.radians(yaw_deg)
        forward = np.array([math.cos(yaw), math.sin(yaw), 0.0])
        right = np.array([math.sin(yaw), -math.cos(yaw), 0.0])
        down = np.array([0.0, 0.0, -1.0])
        pose = np.eye(4)
        pose[:3, :3] = np.stack([right, down, forward], axis=1)  # camera axes (x right, y down, z forward)
        pose[:3, 3] = mount
        cam2ego.append(pose)
    return CameraRig(tuple(cameras), np.stack(intrinsics), np.stack(cam2ego), (height, width))


@dataclass
class Scene:
    """One driving sequence: ego poses and world-frame object tracks, sampled at ``dt`` seconds."""

    ego_xy: np.ndarray  # (F, 2) world position
    ego_yaw: np.ndarray  # (F,)
    ego_speed: float
    ego_yaw_rate: float
    classes: np.ndarray  # (K,) index into the class list
    sizes: np.ndarray  # (K, 3) w, l, h
    start_xy: np.ndarray  # (K, 2) world position at frame 0
    yaw: np.ndarray  # (K,) world heading
    velocity: np.ndarray  # (K, 2) world velocity
    dt: float
    class_names: tuple[str, ...] = ()

    @property
    def num_frames(self) -> int:
        return len(self.ego_yaw)

    def ego2global(self, frame: int) -> np.ndarray:
        """(4, 4) pose of the ego frame in the world (z = 0 plane is the ground)."""
        c, s = math.cos(self.ego_yaw[frame]), math.sin(self.ego_yaw[frame])
        pose = np.eye(4)
        pose[:2, :2] = [[c, -s], [s, c]]
        pose[:2, 3] = self.ego_xy[frame]
        return pose

    def boxes(self, frame: int) -> np.ndarray:
        """(K, 9) every object at ``frame`` in the ego frame: x, y, z, w, l, h, yaw, vx, vy."""
        world = self.start_xy + self.velocity * (frame * self.dt)
        c, s = math.cos(self.ego_yaw[frame]), math.sin(self.ego_yaw[frame])
        to_ego = np.array([[c, s], [-s, c]])  # world -> ego rotation
        xy = (world - self.ego_xy[frame]) @ to_ego.T
        vel = self.velocity @ to_ego.T
        yaw = _wrap(self.yaw - self.ego_yaw[frame])
        z = self.sizes[:, 2:3] / 2
        return np.concatenate([xy, z, self.sizes, yaw[:, None], vel], axis=1)

    def attributes(self) -> np.ndarray:
        """(K,) nuScenes attribute index per object (-1: the class has none), from its motion."""
        moving = np.linalg.norm(self.velocity, axis=1) > 0.2
        return np.array(
            [_attribute(int(c), bool(m), self.class_names) for c, m in zip(self.classes, moving)],
            dtype=np.int64,
        )


def _attribute(label: int, moving: bool, names: tuple[str, ...]) -> int:
    name = names[label]
    if name in ("car", "truck", "bus", "trailer", "construction_vehicle"):
        return ATTRIBUTE_NAMES.index("vehicle.moving" if moving else "vehicle.parked")
    if name == "pedestrian":
        return ATTRIBUTE_NAMES.index("pedestrian.moving" if moving else "pedestrian.standing")
    if name in ("bicycle", "motorcycle"):
        return ATTRIBUTE_NAMES.index("cycle.with_rider" if moving else "cycle.without_rider")
    return -1


def _wrap(angle: np.ndarray) -> np.ndarray:
    return (angle + np.pi) % (2 * np.pi) - np.pi


def make_scene(
    rng: np.random.Generator,
    class_names: tuple[str, ...],
    *,
    num_frames: int,
    num_objects: int,
    radius: float,
    dt: float = 0.5,
) -> Scene:
    """Draw an ego arc and ``num_objects`` tracks placed around it, none through the ego's own path."""
    speed = float(rng.uniform(0.0, 8.0))
    yaw_rate = float(rng.uniform(-0.12, 0.12))
    yaw0 = float(rng.uniform(-np.pi, np.pi))
    t = np.arange(num_frames) * dt
    ego_yaw = yaw0 + yaw_rate * t
    # Integrate the arc in closed form where it turns, straight otherwise.
    if abs(yaw_rate) > 1e-6:
        ego_xy = np.stack(
            [
                speed / yaw_rate * (np.sin(ego_yaw) - math.sin(yaw0)),
                -speed / yaw_rate * (np.cos(ego_yaw) - math.cos(yaw0)),
            ],
            axis=1,
        )
    else:
        ego_xy = np.stack([speed * t * math.cos(yaw0), speed * t * math.sin(yaw0)], axis=1)
    centre = ego_xy[num_frames // 2]
    tracks = _place_tracks(rng, class_names, num_objects, centre, radius, t, t[num_frames // 2], [ego_xy])
    scene = Scene(
        ego_xy=ego_xy,
        ego_yaw=ego_yaw,
        ego_speed=speed,
        ego_yaw_rate=yaw_rate,
        **_track_fields(*tracks),
        dt=dt,
        class_names=tuple(class_names),
    )
    return scene


def _track_fields(
    classes: list, sizes: list, starts: list, yaws: list, velocities: list
) -> dict[str, np.ndarray]:
    """``Scene``'s object fields from ``_place_tracks``' lists (empty lists give empty arrays of the right width)."""
    return {
        "classes": np.array(classes, dtype=np.int64),
        "sizes": np.array(sizes, dtype=np.float64).reshape(-1, 3),
        "start_xy": np.array(starts, dtype=np.float64).reshape(-1, 2),
        "yaw": np.array(yaws, dtype=np.float64),
        "velocity": np.array(velocities, dtype=np.float64).reshape(-1, 2),
    }


def _place_tracks(
    rng: np.random.Generator,
    class_names: tuple[str, ...],
    num_objects: int,
    centre: np.ndarray,
    radius: float,
    t: np.ndarray,
    t_mid: float,
    keep_clear: list[np.ndarray],
    fixed: tuple[list, ...] | None = None,
) -> tuple[list, list, list, list, list]:
    """Draw up to ``num_objects`` straight tracks (at ``centre`` +- ``radius`` at time ``t_mid``) that keep 3.5 m
    clear of every path in ``keep_clear`` ((len(t), 2) each) and 0.3 m clear of each other and of ``fixed``
    (tracks already placed: classes, sizes, starts, yaws, velocities)."""
    classes, sizes, starts, yaws, velocities = fixed if fixed is not None else ([], [], [], [], [])
    placed = len(classes)
    attempts = 0
    while len(classes) - placed < num_objects and attempts < num_objects * 50:
        attempts += 1
        label = int(rng.integers(len(class_names)))
        mean_size, _, p_move, (v_lo, v_hi) = CLASS_STYLE[class_names[label]]
        size = np.array(mean_size) * rng.uniform(0.85, 1.15, size=3)
        r = radius * math.sqrt(rng.uniform(0.02, 1.0))
        phi = rng.uniform(-np.pi, np.pi)
        mid = centre + r * np.array([math.cos(phi), math.sin(phi)])
        yaw = float(rng.uniform(-np.pi, np.pi))
        v = rng.uniform(v_lo, v_hi) if rng.uniform() < p_move else 0.0
        vel = v * np.array([math.cos(yaw), math.sin(yaw)])
        start = mid - vel * t_mid
        track = start + vel * t[:, None]
        reach = 0.5 * math.hypot(size[0], size[1])
        if any(np.min(np.linalg.norm(track - path, axis=1)) < reach + 3.5 for path in keep_clear):
            continue  # would drive through the ego vehicle
        if starts:
            others = np.stack(starts)[None] + np.stack(velocities)[None] * t[:, None, None]  # (F, K, 2)
            other_reach = 0.5 * np.hypot(np.stack(sizes)[:, 0], np.stack(sizes)[:, 1])
            gap = np.linalg.norm(others - track[:, None], axis=2) - other_reach[None] - reach
            if gap.min() < 0.3:
                continue  # would overlap another box at some frame
        classes.append(label)
        sizes.append(size)
        starts.append(start)
        yaws.append(yaw)
        velocities.append(vel)
    return classes, sizes, starts, yaws, velocities


#: Deceleration (m/s^2) of the ego's braking for an obstacle: one comfortable value, so when it starts braking
#: follows from what the cameras show (distance to the obstacle) and its speed.
BRAKE_DECEL = 2.0
#: The braking starts this many seconds (at most) after the last rendered frame: the last key frames of a scene
#: with an obstacle have a constant-velocity past and brake within 1 to 4 s, by 1 to 9 m against cruising.
BRAKE_WINDOW = 1.0
#: Bumper-to-obstacle gap (m) the ego stops at.
STOP_GAP = 2.0
#: Look-ahead (m) along the unobstructed route that sets the driving command, and the lateral offset (m) there
#: that makes it a turn.
COMMAND_LOOKAHEAD, COMMAND_OFFSET = 20.0, 2.0
#: Driving commands, in VAD's order (``gt_ego_fut_cmd`` one-hot index).
COMMANDS = ("right", "left", "straight")


@dataclass
class PlanningScene(Scene):
    """A scene whose ego drives a route and reacts to what is on it.

    ``Scene``'s fields hold the rendered frames; ``track_*`` hold the ego's drive at every step of
    ``past`` frames before the first rendered frame to ``future`` frames after the last, so each rendered frame
    has its past and its future. ``track_speed`` is the speed along the route, ``curvature`` the route's
    (1/m). ``brake_time`` (s, rendered frame 0 at t = 0) is when the ego starts braking for the obstacle,
    ``inf`` in a scene with nothing in its way; ``obstacle`` is the index of that object (-1: none).
    """

    track_xy: np.ndarray = None  # (past + F + future, 2) world
    track_yaw: np.ndarray = None
    track_speed: np.ndarray = None
    curvature: float = 0.0
    past: int = 0
    future: int = 0
    brake_time: float = math.inf
    obstacle: int = -1

    def _step(self, frame: int, offset: int) -> int:
        return self.past + frame + offset

    def ego_points(self, frame: int, offsets: range) -> np.ndarray:
        """(len(offsets), 2) the ego's positions ``offsets`` steps from ``frame``, in ``frame``'s ego frame."""
        steps = [self._step(frame, k) for k in offsets]
        return self._to_ego(frame, self.track_xy[steps])

    def _to_ego(self, frame: int, world: np.ndarray) -> np.ndarray:
        c, s = math.cos(self.ego_yaw[frame]), math.sin(self.ego_yaw[frame])
        return (world - self.ego_xy[frame]) @ np.array([[c, s], [-s, c]]).T

    def speed(self, frame: int) -> float:
        return float(self.track_speed[self._step(frame, 0)])

    def acceleration(self, frame: int) -> float:
        """Backward difference of the speed over the last step (m/s^2), as a CAN bus would report it."""
        step = self._step(frame, 0)
        return float(self.track_speed[step] - self.track_speed[step - 1]) / self.dt

    def yaw_rate(self, frame: int) -> float:
        return self.curvature * self.speed(frame)

    def agent_futures(self, frame: int) -> np.ndarray:
        """(K, future, 5) every object's box ``x, y, w, l, yaw`` at the ``future`` steps after ``frame``, in
        ``frame``'s ego frame (where the planned waypoints are)."""
        times = (frame + np.arange(1, self.future + 1)) * self.dt
        world = self.start_xy[:, None] + self.velocity[:, None] * times[None, :, None]  # (K, H, 2)
        xy = self._to_ego(frame, world.reshape(-1, 2)).reshape(len(self.classes), self.future, 2)
        yaw = np.broadcast_to(_wrap(self.yaw - self.ego_yaw[frame])[:, None], xy.shape[:2])
        wl = np.broadcast_to(self.sizes[:, None, :2], (*xy.shape[:2], 2))
        return np.concatenate([xy, wl, yaw[..., None]], axis=-1)

    def command(self, frame: int) -> int:
        """Index into ``COMMANDS``: where the route (not the ego's reaction) goes, ``COMMAND_LOOKAHEAD`` metres on."""
        lateral = _arc(0.0, self.curvature, np.array([COMMAND_LOOKAHEAD]))[0, 1]
        if lateral > COMMAND_OFFSET:
            return COMMANDS.index("left")
        if lateral < -COMMAND_OFFSET:
            return COMMANDS.index("right")
        return COMMANDS.index("straight")


def _arc(yaw0: float, curvature: float, s: np.ndarray) -> np.ndarray:
    """(len(s), 2) points at arc lengths ``s`` along a circle of ``curvature`` from the origin, heading ``yaw0``."""
    if abs(curvature) < 1e-6:
        return np.stack([s * math.cos(yaw0), s * math.sin(yaw0)], axis=1)
    yaw = yaw0 + curvature * s
    return np.stack(
        [(np.sin(yaw) - math.sin(yaw0)) / curvature, -(np.cos(yaw) - math.cos(yaw0)) / curvature], axis=1
    )


def _braking_profile(t: np.ndarray, speed: float, brake_time: float) -> tuple[np.ndarray, np.ndarray]:
    """Arc length and speed at times ``t``: cruise at ``speed``, from ``brake_time`` brake at ``BRAKE_DECEL``."""
    tau = np.clip(t - brake_time, 0.0, speed / BRAKE_DECEL)
    arc = speed * np.minimum(t, brake_time) + speed * tau - 0.5 * BRAKE_DECEL * tau**2
    return arc, np.where(t < brake_time, speed, speed - BRAKE_DECEL * tau)


def make_planning_scene(
    rng: np.random.Generator,
    class_names: tuple[str, ...],
    *,
    num_frames: int,
    num_objects: int,
    radius: float,
    past: int = 4,
    future: int = 6,
    dt: float = 0.5,
    reactive: float = 0.5,
) -> PlanningScene:
    """A scene where the ego's future depends on what the cameras see.

    The ego cruises a route of constant curvature at a constant speed. With probability ``reactive`` something
    stands in its way: a stopped vehicle in the lane, or a pedestrian who crosses it just when the ego would
    pass; the ego then brakes at ``BRAKE_DECEL`` to stop ``STOP_GAP`` metres short of it. The braking starts
    within ``BRAKE_WINDOW`` seconds after the last rendered frame, so every key frame has a plain
    constant-velocity past (zero acceleration) and the last ones a future that is not: a key frame already
    braking would give the reaction away through the ego status, and then the cameras would not be needed.
    Only the obstacle, seen in the cameras, tells these frames apart from the scenes with a free road.
    Other objects keep clear of the whole route, so the obstacle is the only reason to deviate.
    """
    speed = float(rng.uniform(2.5, 6.0))  # <= 6 m/s: a stop that starts within 2 s is inside +-25.6 m
    curvature = float(rng.uniform(-0.03, 0.03)) if rng.uniform() < 0.5 else float(rng.uniform(-0.004, 0.004))
    yaw0 = float(rng.uniform(-np.pi, np.pi))
    t = np.arange(-past, num_frames + future) * dt
    vehicles = [c for c in ("car", "truck", "bus") if c in class_names]
    kinds = [k for k, ok in (("vehicle", vehicles), ("pedestrian", "pedestrian" in class_names)) if ok]
    brake_time, kind = math.inf, None
    if kinds and rng.uniform() < reactive:
        kind = kinds[int(rng.integers(len(kinds)))]
        brake_time = float(rng.uniform(0.0, BRAKE_WINDOW) + (num_frames - 1) * dt)
    arc, track_speed = _braking_profile(t, speed, brake_time)
    track_xy = _arc(yaw0, curvature, arc)
    route_xy = _arc(yaw0, curvature, speed * t)  # where the ego would drive with a free road
    zero = past  # step of rendered frame 0
    track_xy = track_xy - track_xy[zero]
    route_xy = route_xy - route_xy[zero]
    track_yaw = yaw0 + curvature * (arc - arc[zero])
    fixed: tuple[list, ...] = ([], [], [], [], [])
    if kind is not None:
        _add_obstacle(rng, class_names, kind, vehicles, speed, brake_time, yaw0, curvature, arc[zero], fixed)
    rendered = slice(zero, zero + num_frames)
    centre = track_xy[zero + num_frames // 2]
    tracks = _place_tracks(rng, class_names, num_objects, centre, radius, t, 0.0, [track_xy, route_xy], fixed)
    return PlanningScene(
        ego_xy=track_xy[rendered],
        ego_yaw=track_yaw[rendered],
        ego_speed=speed,
        ego_yaw_rate=curvature * speed,
        **_track_fields(*tracks),
        dt=dt,
        class_names=tuple(class_names),
        track_xy=track_xy,
        track_yaw=track_yaw,
        track_speed=track_speed,
        curvature=curvature,
        past=past,
        future=future,
        brake_time=brake_time,
        obstacle=0 if kind is not None else -1,
    )


def _add_obstacle(
    rng: np.random.Generator,
    class_names: tuple[str, ...],
    kind: str,
    vehicles: list[str],
    speed: float,
    brake_time: float,
    yaw0: float,
    curvature: float,
    arc_origin: float,
    fixed: tuple[list, ...],
) -> None:
    """Append the object the ego brakes for to ``fixed``; world frame with rendered frame 0's ego at the origin."""
    stop_arc = speed * brake_time + speed**2 / (2 * BRAKE_DECEL) - arc_origin
    name = vehicles[int(rng.integers(len(vehicles)))] if kind == "vehicle" else "pedestrian"
    size = np.array(CLASS_STYLE[name][0]) * rng.uniform(0.9, 1.1, size=3)
    at = stop_arc + EGO_SIZE[1] / 2 + STOP_GAP + size[1 if kind == "vehicle" else 0] / 2
    centre = _arc(yaw0, curvature, np.array([at]))[0]
    heading = yaw0 + curvature * at
    if kind == "vehicle":
        yaw, velocity, start = heading, np.zeros(2), centre
    else:  # crosses the lane, at its middle when the ego would have got there at its cruising speed
        side = 1.0 if rng.uniform() < 0.5 else -1.0
        yaw = heading + side * np.pi / 2
        walk = float(rng.uniform(0.8, 1.4))
        velocity = walk * np.array([math.cos(yaw), math.sin(yaw)])
        start = centre - velocity * ((at + arc_origin) / speed + rng.uniform(-0.5, 0.5))
    for values, value in zip(fixed, (class_names.index(name), size, start, float(yaw), velocity)):
        values.append(value)


_SUN = np.array([0.35, 0.25, 0.9]) / np.linalg.norm([0.35, 0.25, 0.9])


def render_frame(
    rig: CameraRig,
    boxes: np.ndarray,
    colours: np.ndarray,
    ego2global: np.ndarray,
    noise: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Ray-cast every camera: ``(images (N, H, W, 3) uint8, pixels per box (K,))``.

    ``boxes`` (K, 9) in the ego frame, ``colours`` (K, 3) in [0, 1]. The nearest face along each pixel's
    ray wins (depth occlusion); its brightness is ambient + sun diffuse, the box's front face (+l side)
    is mixed with white so the heading can be read. The ground carries a 4 m world-fixed checker texture
    that fades with distance, so it slides under the ego as it moves.
    """
    height, width = rig.img_size
    n = len(rig.names)
    v, u = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    pix = np.stack([u, v, np.ones_like(u)], axis=-1).reshape(-1, 3)  # (P, 3)
    dirs_cam = pix @ np.linalg.inv(rig.intrinsics).transpose(0, 2, 1)  # (N, P, 3)
    dirs = dirs_cam @ rig.cam2ego[:, :3, :3].transpose(0, 2, 1)
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    origins = np.broadcast_to(rig.cam2ego[:, None, :3, 3], dirs.shape)
    dirs, origins = dirs.reshape(-1, 3), origins.reshape(-1, 3)  # (R, 3)

    # Background: sky above the horizon, textured ground below.
    image = np.empty_like(dirs)
    sky = dirs[:, 2] >= -1e-3
    image[sky] = np.array([0.55, 0.7, 0.9]) + 0.25 * dirs[sky, 2:3]
    ground = ~sky
    t_ground = -origins[ground, 2] / dirs[ground, 2]
    hit = origins[ground] + t_ground[:, None] * dirs[ground]
    world = hit[:, :2] @ ego2global[:2, :2].T + ego2global[:2, 3]
    checker = (np.floor(world[:, 0] / 4.0) + np.floor(world[:, 1] / 4.0)) % 2
    fade = np.exp(-t_ground / 40.0)[:, None]
    grey = 0.38 + 0.07 * checker[:, None] * fade
    image[ground] = grey * np.array([1.0, 1.0, 0.97]) * (0.8 + 0.2 * fade)

    depth = np.full(len(dirs), np.inf)
    owner = np.full(len(dirs), -1)
    for k, box in enumerate(boxes):
        x, y, z, size_w, size_l, size_h, yaw = box[:7]
        c, s = math.cos(yaw), math.sin(yaw)
        to_local = np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])
        o = (origins - np.array([x, y, z])) @ to_local.T
        d = dirs @ to_local.T
        half = np.array([size_l, size_w, size_h]) / 2
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / np.where(np.abs(d) < 1e-12, 1e-12, d)
            t1, t2 = (-half - o) * inv, (half - o) * inv
        near = np.minimum(t1, t2)
        t_near, t_far = near.max(axis=1), np.maximum(t1, t2).min(axis=1)
        front = (t_near <= t_far) & (t_near > 0) & (t_near < depth)
        if not front.any():
            continue
        axis = near[front].argmax(axis=1)
        sign = -np.sign(d[front, axis])
        normal_local = np.zeros((int(front.sum()), 3))
        normal_local[np.arange(len(axis)), axis] = sign
        normal = normal_local @ to_local  # local -> ego
        shade = 0.45 + 0.55 * np.clip(normal @ _SUN, 0.0, 1.0)
        colour = colours[k][None] * shade[:, None]
        is_front = (axis == 0) & (sign > 0)
        colour[is_front] = 0.5 * colour[is_front] + 0.5
        image[front] = colour
        depth[front] = t_near[front]
        owner[front] = k
    if noise is not None:
        image = image + noise.reshape(image.shape)
    images = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8).reshape(n, height, width, 3)
    pixels = np.bincount(owner[owner >= 0], minlength=len(boxes))
    return images, pixels
