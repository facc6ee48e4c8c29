"""BEV grid geometry: reference points, their projection into cameras, and ego-motion alignment.

Grid convention (BEVFormer's): query ``r * W + c`` is the cell in row ``r`` and column ``c``; x grows with
the column, y with the row; normalised coordinates are cell centres ``(c + 0.5) / W``, ``(r + 0.5) / H``
over the ``point_cloud_range``. Everything here is computed per sample: nothing is taken from the first
sample of a batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["align_previous_bev", "project_to_cameras", "reference_points_2d", "reference_points_3d"]


def reference_points_2d(bev_h: int, bev_w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(H*W, 2) normalised (x, y) cell centres."""
    ys = (torch.arange(bev_h, device=device, dtype=dtype) + 0.5) / bev_h
    xs = (torch.arange(bev_w, device=device, dtype=dtype) + 0.5) / bev_w
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x.flatten(), y.flatten()], -1)


def reference_points_3d(
    bev_h: int, bev_w: int, num_heights: int, device=None, dtype=torch.float32
) -> torch.Tensor:
    """(H*W, Z, 3) normalised (x, y, z): each pillar lifted to ``Z`` evenly spaced heights (bin centres)."""
    zs = (torch.arange(num_heights, device=device, dtype=dtype) + 0.5) / num_heights
    xy = reference_points_2d(bev_h, bev_w, device, dtype)
    xy = xy[:, None].expand(-1, num_heights, -1)
    return torch.cat([xy, zs.view(1, -1, 1).expand(xy.shape[0], -1, 1)], -1)


def project_to_cameras(
    reference_3d: torch.Tensor,
    point_cloud_range: Sequence[float],
    lidar2img: torch.Tensor,
    img_size: tuple[int, int],
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Project the pillars' points into every camera of every sample.

    Args:
        reference_3d: (Q, Z, 3) normalised points.
        lidar2img: (B, N, 4, 4), per sample (calibrations may differ within a batch).
        img_size: (H, W) of the images the matrices refer to.

    Returns:
        ``(uv, visible)``: (B, N, Q, Z, 2) normalised image coordinates and (B, N, Q, Z) whether the point is
        in front of the camera and inside the image. Computed in float32 whatever the autocast dtype.
    """
    if lidar2img.dim() != 4 or lidar2img.shape[-2:] != (4, 4):
        raise ValueError(f"lidar2img must be (B, cameras, 4, 4), got {tuple(lidar2img.shape)}")
    pc = torch.tensor(point_cloud_range, dtype=torch.float32, device=reference_3d.device)
    with torch.autocast(device_type=reference_3d.device.type, enabled=False):
        points = reference_3d.float() * (pc[3:] - pc[:3]) + pc[:3]
        points = torch.cat([points, torch.ones_like(points[..., :1])], -1)  # (Q, Z, 4)
        cam = torch.einsum("bnij,qzj->bnqzi", lidar2img.float(), points)
        depth = cam[..., 2]
        uv = cam[..., :2] / depth.clamp(min=eps)[..., None]
        uv = uv / torch.tensor([img_size[1], img_size[0]], dtype=torch.float32, device=uv.device)
        visible = (depth > eps) & (uv[..., 0] > 0) & (uv[..., 0] < 1) & (uv[..., 1] > 0) & (uv[..., 1] < 1)
    return torch.nan_to_num(uv), visible


def align_previous_bev(
    prev_bev: torch.Tensor,
    can_bus: torch.Tensor,
    bev_h: int,
    bev_w: int,
    point_cloud_range: Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn the previous BEV into the current heading and give the shift of the history reference points.

    With the current pose (R_c, t_c) and the previous (R_p, t_p), a current-frame point q was at
    ``R_p^T (R_c q + t_c - t_p) = Rot(dyaw) q + d`` in the previous frame. The map is first rotated by
    ``dyaw`` about the ego, which is the grid's own centre for the symmetric ranges used here, whatever the
    grid size (BEVFormer rotates about a hard-coded (100, 100)), by bilinear resampling; sampling the
    rotated map at ``q + R_c^T (t_c - t_p)`` then reads the same world point. That shift is returned in
    normalised grid units, per sample.

    Args:
        prev_bev: (B, H*W, C).
        can_bus: (B, 18): ``[0:2]`` world translation since the previous frame, ``[16]`` current yaw (rad),
            ``[17]`` yaw change (degrees).

    Returns:
        ``(rotated (B, H*W, C), shift (B, 2))``.
    """
    batch, _, channels = prev_bev.shape
    x_min, y_min, _, x_max, y_max, _ = (float(v) for v in point_cloud_range)
    size_x, size_y = x_max - x_min, y_max - y_min
    can_bus = can_bus.float()
    yaw = can_bus[:, 16]
    delta = torch.deg2rad(can_bus[:, 17])
    dx, dy = can_bus[:, 0], can_bus[:, 1]
    # the ego translation expressed in the current ego frame, in grid units
    shift = torch.stack(
        [(yaw.cos() * dx + yaw.sin() * dy) / size_x, (-yaw.sin() * dx + yaw.cos() * dy) / size_y], -1
    )
    # output cell g (normalised [-1, 1]) samples the input at S^-1 (R (c + S g) - c): c the grid centre in
    # metres (the ego at the origin), S the half sizes.
    cos, sin = delta.cos(), delta.sin()
    half = torch.tensor([size_x / 2, size_y / 2], device=prev_bev.device)
    centre = torch.tensor([(x_min + x_max) / 2, (y_min + y_max) / 2], device=prev_bev.device)
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (B, 2, 2)
    linear = rot * half[None, None, :] / half[None, :, None]
    offset = (torch.einsum("bij,j->bi", rot, centre) - centre) / half
    theta = torch.cat([linear, offset[..., None]], -1).to(prev_bev.dtype)
    grid_map = prev_bev.transpose(1, 2).reshape(batch, channels, bev_h, bev_w)
    grid = F.affine_grid(theta, [batch, channels, bev_h, bev_w], align_corners=False)
    rotated = F.grid_sample(grid_map, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return rotated.flatten(2).transpose(1, 2), shift.to(prev_bev.dtype)
