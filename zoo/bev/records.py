"""What ``BEVFormerDetector.predict_step`` writes: nuScenes submission boxes and a top-down picture.

A detection leaves the head as 9 values ``x, y, z, w, l, h, yaw, vx, vy`` in the LiDAR frame of its sample
(the ego frame for the embedded synthetic scenes): gravity centre in metres, ``l`` along the heading, ``yaw``
from +x towards +y about +z, velocity in m/s. The nuScenes detection submission
(https://www.nuscenes.org/object-detection) wants each box in the *global* frame: ``translation`` (centre,
m), ``size`` ``[w, l, h]``, ``rotation`` as a quaternion ``[w, x, y, z]``, ``velocity`` ``[vx, vy]``.
``box_to_submission`` moves a box there with the sample's ``lidar2global`` pose, the way mmdet3d's
``lidar_nusc_box_to_global`` does (rotate centre, heading and velocity, then translate the centre).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["box_to_submission", "draw_top_down", "rotation_to_quaternion"]

#: One colour per nuScenes class (matplotlib's tab10); other class names take a colour by label.
CLASS_COLOURS = {
    "car": (31, 119, 180), "truck": (255, 127, 14), "construction_vehicle": (140, 86, 75),
    "bus": (44, 160, 44), "trailer": (127, 127, 127), "barrier": (214, 39, 40),
    "motorcycle": (148, 103, 189), "bicycle": (23, 190, 207), "pedestrian": (227, 119, 194),
    "traffic_cone": (188, 189, 34),
}  # fmt: skip
_FALLBACK_COLOURS = tuple(CLASS_COLOURS.values())


def rotation_to_quaternion(matrix: np.ndarray) -> list[float]:
    """A 3 x 3 rotation matrix -> unit quaternion ``[w, x, y, z]`` with ``w >= 0`` (Shepperd's method)."""
    m = np.asarray(matrix, dtype=np.float64)
    trace = m[0, 0] + m[1, 1] + m[2, 2]
    if trace > 0:
        s = 2.0 * math.sqrt(trace + 1.0)
        q = [s / 4, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = 2.0 * math.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
        q = [(m[2, 1] - m[1, 2]) / s, s / 4, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif m[1, 1] > m[2, 2]:
        s = 2.0 * math.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, s / 4, (m[1, 2] + m[2, 1]) / s]
    else:
        s = 2.0 * math.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, s / 4]
    sign = -1.0 if q[0] < 0 else 1.0
    return [sign * v + 0.0 for v in q]  # + 0.0: no -0.0 in the written JSON


def box_to_submission(box: Sequence[float], lidar2global: np.ndarray | None = None) -> dict[str, list[float]]:
    """One ``x, y, z, w, l, h, yaw, vx, vy`` box -> nuScenes' ``translation``, ``size``, ``rotation`` and
    ``velocity``.


    ``lidar2global`` (4 x 4) is the pose of the box's frame in the global frame; without it the box keeps its
    own frame. The velocity is rotated as a 3D vector with no vertical part, and its ground-plane part kept.
    """
    pose = np.eye(4) if lidar2global is None else np.asarray(lidar2global, dtype=np.float64)
    x, y, z, w, l, h, yaw, vx, vy = (float(v) for v in box)  # noqa: E741
    c, s = math.cos(yaw), math.sin(yaw)
    heading = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    rotation = pose[:3, :3]
    return {
        "translation": (rotation @ [x, y, z] + pose[:3, 3]).tolist(),
        "size": [w, l, h],
        "rotation": rotation_to_quaternion(rotation @ heading),
        "velocity": (rotation @ [vx, vy, 0.0])[:2].tolist(),
    }


def _colour(label: int, class_names: Sequence[str]) -> tuple[int, int, int]:
    name = class_names[label]
    return CLASS_COLOURS.get(name, _FALLBACK_COLOURS[label % len(_FALLBACK_COLOURS)])


def _footprint(box: Sequence[float]) -> np.ndarray:
    """(4, 2) ground-plane corners (x, y) of a box, front pair first."""
    x, y, _, w, l, _, yaw = (float(v) for v in box[:7])  # noqa: E741
    c, s = math.cos(yaw), math.sin(yaw)
    local = np.array([[l / 2, w / 2], [l / 2, -w / 2], [-l / 2, -w / 2], [-l / 2, w / 2]])
    return local @ np.array([[c, s], [-s, c]]) + [x, y]


def draw_top_down(
    pred_boxes: np.ndarray,
    pred_labels: Sequence[int],
    pred_scores: Sequence[float],
    gt_boxes: np.ndarray,
    gt_labels: Sequence[int],
    class_names: Sequence[str],
    point_cloud_range: Sequence[float],
    size: int = 400,
) -> Image.Image:
    """A bird's-eye picture of the BEV range: predictions filled in their class colour (opacity = score, a
    line to the front face), ground truth outlined in the class colour darkened by half, the ego a black
    triangle at the origin, grid lines every 10 m and the class names in their colours.

    The ego frame's +x (forward) points up and +y (left) to the left; ``size`` pixels span the longer side.
    """
    x_min, y_min, _, x_max, y_max, _ = (float(v) for v in point_cloud_range)
    scale = size / max(x_max - x_min, y_max - y_min)
    width, height = round((y_max - y_min) * scale), round((x_max - x_min) * scale)

    def pixels(points: np.ndarray) -> list[tuple[float, float]]:
        return [((y_max - py) * scale, (x_max - px) * scale) for px, py in points]

    image = Image.new("RGBA", (width, height), (255, 255, 255, 255))
    grid = ImageDraw.Draw(image)
    for metres in range(math.ceil(x_min / 10) * 10, math.floor(x_max / 10) * 10 + 1, 10):
        grid.line(pixels([(metres, y_min), (metres, y_max)]), fill=(230, 230, 230))
    for metres in range(math.ceil(y_min / 10) * 10, math.floor(y_max / 10) * 10 + 1, 10):
        grid.line(pixels([(x_min, metres), (x_max, metres)]), fill=(230, 230, 230))
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for box, label, score in zip(pred_boxes, pred_labels, pred_scores):
        colour = _colour(int(label), class_names)
        corners = _footprint(box)
        alpha = round(255 * min(max(float(score), 0.0), 1.0))
        draw.polygon(pixels(corners), fill=(*colour, alpha))
        draw.line(pixels([box[:2], corners[:2].mean(0)]), fill=(0, 0, 0, alpha), width=1)
    image = Image.alpha_composite(image, overlay)
    draw = ImageDraw.Draw(image)
    for box, label in zip(gt_boxes, gt_labels):
        corners = pixels(_footprint(box))
        outline = tuple(v // 2 for v in _colour(int(label), class_names))
        draw.line([*corners, corners[0]], fill=outline, width=2)
    draw.polygon(pixels([(2.0, 0.0), (-1.0, 1.0), (-1.0, -1.0)]), fill=(0, 0, 0))
    for row, name in enumerate(class_names):
        draw.text((4, 4 + 11 * row), name, fill=_colour(row, class_names))
    return image.convert("RGB")
