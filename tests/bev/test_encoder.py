"""The encoder's geometry and the reference's bugs, fixed: rotation about the grid centre for any grid size,
per-sample camera visibility, batches equal to per-sample runs, history references shifted without aliasing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zoo.bev import BEVFORMER_CONFIGS, BEVFormer
from zoo.bev.encoder import SpatialCrossAttention, TemporalSelfAttention
from zoo.bev.geometry import align_previous_bev, project_to_cameras, reference_points_2d, reference_points_3d
from zoo.datamodules.bev import can_bus_vector
from zoo.datamodules.bev_scenes import nuscenes_rig

RANGE = (-25.6, -25.6, -1.0, 25.6, 25.6, 4.0)


def metric_map(bev_h: int, bev_w: int, pc=RANGE) -> torch.Tensor:
    """(1, H*W, 2): each cell's own metric (x, y): a linear field, which bilinear resampling keeps exactly."""
    ref = reference_points_2d(bev_h, bev_w, dtype=torch.float64)
    x = ref[:, 0] * (pc[3] - pc[0]) + pc[0]
    y = ref[:, 1] * (pc[4] - pc[1]) + pc[1]
    return torch.stack([x, y], -1)[None]


def pose(x: float, y: float, yaw: float) -> np.ndarray:
    out = np.eye(4)
    out[:2, :2] = [[math.cos(yaw), -math.sin(yaw)], [math.sin(yaw), math.cos(yaw)]]
    out[:2, 3] = [x, y]
    return out


@pytest.mark.parametrize(
    ("bev_h", "bev_w", "pc"), [(50, 50, RANGE), (37, 37, RANGE), (20, 30, (-30, -20, -1, 30, 20, 3))]
)
def test_rotation_turns_about_the_grid_centre_for_any_grid_size(bev_h, bev_w, pc):
    can_bus = torch.zeros(1, 18, dtype=torch.float64)
    can_bus[0, 17] = 30.0  # degrees
    field = metric_map(bev_h, bev_w, pc)
    rotated, shift = align_previous_bev(field, can_bus, bev_h, bev_w, pc)
    assert torch.equal(shift, torch.zeros_like(shift))
    q = metric_map(bev_h, bev_w, pc)[0]
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    expected = torch.stack([c * q[:, 0] - s * q[:, 1], s * q[:, 0] + c * q[:, 1]], -1)
    # where the rotated position stays a cell away from the border, bilinear resampling is exact
    cell = max((pc[3] - pc[0]) / bev_w, (pc[4] - pc[1]) / bev_h)
    inside = (expected[:, 0].abs() < pc[3] - cell) & (expected[:, 1].abs() < pc[4] - cell)
    assert inside.sum() > 0.3 * len(q)
    assert torch.allclose(rotated[0][inside], expected[inside], atol=1e-5)  # float32 geometry


def test_history_shift_reads_the_same_world_point():
    bev = 40
    prev_pose, cur_pose = pose(3.0, -2.0, 0.4), pose(7.0, 1.5, 0.65)
    can_bus = torch.from_numpy(can_bus_vector(cur_pose, prev_pose, 0.0, 0.0))[None]
    field = metric_map(bev, bev)  # the previous BEV stores each cell's previous-frame coordinates
    rotated, shift = align_previous_bev(field, can_bus, bev, bev, RANGE)
    ref = reference_points_2d(bev, bev, dtype=torch.float64) + shift[0]
    grid = (2 * ref - 1).view(1, 1, -1, 2)
    sampled = F.grid_sample(rotated.transpose(1, 2).reshape(1, 2, bev, bev), grid, align_corners=False)[
        0, :, 0
    ].T
    # what each current cell q really was in the previous frame: R_p^T (R_c q + t_c - t_p)
    q = metric_map(bev, bev)[0].numpy()
    world = q @ cur_pose[:2, :2].T + cur_pose[:2, 3]
    expected = (world - prev_pose[:2, 3]) @ prev_pose[:2, :2]
    where = q + shift[0].numpy() * 51.2  # the location read in the rotated map
    inside = (np.abs(expected) < 25.6 - 2.6).all(1) & (np.abs(where) < 25.6 - 2.6).all(1)
    assert inside.sum() > 0.3 * len(q)
    assert np.allclose(sampled.numpy()[inside], expected[inside], atol=1e-5)  # float32 geometry


def test_history_references_are_shifted_without_aliasing_the_current_ones():
    torch.manual_seed(0)
    tsa = TemporalSelfAttention(embed_dims=16, num_heads=2, num_points=4, dropout=0.0).double()
    query, pos, prev = (torch.randn(2, 36, 16, dtype=torch.float64) for _ in range(3))
    ref = reference_points_2d(6, 6, dtype=torch.float64)
    before = ref.clone()
    shift = torch.tensor([[0.1, -0.05], [0.0, 0.2]], dtype=torch.float64)
    out = tsa(query, pos, prev, torch.ones(2, dtype=torch.bool), ref, shift, (6, 6))
    assert torch.equal(ref, before)
    # the same computation with the two groups' references built by hand: history shifted, current not
    refs = torch.stack([ref[None] + shift[:, None], ref[None].expand(2, -1, -1)], 2)[:, :, :, None]
    manual = query + tsa.attention(
        torch.cat([prev, query + pos], -1), torch.stack([prev, query], 1), refs, [(6, 6)]
    )
    assert torch.allclose(out, manual)
    aliased = torch.stack([ref[None] + shift[:, None]] * 2, 2)[:, :, :, None]
    wrong = query + tsa.attention(
        torch.cat([prev, query + pos], -1), torch.stack([prev, query], 1), aliased, [(6, 6)]
    )
    assert not torch.allclose(out, wrong)


def test_first_frame_falls_back_to_self_attention_per_sample():
    torch.manual_seed(0)
    tsa = TemporalSelfAttention(embed_dims=16, num_heads=2, num_points=4, dropout=0.0).double()
    query, pos, prev = (torch.randn(2, 16, 16, dtype=torch.float64) for _ in range(3))
    ref = reference_points_2d(4, 4, dtype=torch.float64)
    shift = torch.zeros(2, 2, dtype=torch.float64)
    mixed = tsa(query, pos, prev, torch.tensor([True, False]), ref, shift, (4, 4))
    with_prev = tsa(query[:1], pos[:1], prev[:1], torch.tensor([True]), ref, shift[:1], (4, 4))
    alone = tsa(query[1:], pos[1:], query[1:], torch.tensor([True]), ref, shift[1:], (4, 4))
    assert torch.allclose(mixed[:1], with_prev) and torch.allclose(mixed[1:], alone)


def rig_matrices(yaw_offset: float) -> torch.Tensor:
    """lidar2img of the nuScenes rig turned by ``yaw_offset`` about z: a different calibration per sample."""
    rig = nuscenes_rig((64, 112))
    turn = pose(0.0, 0.0, yaw_offset)
    return torch.from_numpy(rig.lidar2img @ turn).float()


def test_camera_visibility_is_per_sample():
    ref_3d = reference_points_3d(16, 16, 4)
    lidar2img = torch.stack([rig_matrices(0.0), rig_matrices(0.7)])
    _, visible = project_to_cameras(ref_3d, RANGE, lidar2img, (64, 112))
    assert visible.shape == (2, 6, 256, 4)
    assert not torch.equal(visible[0], visible[1])
    torch.manual_seed(0)
    sca = SpatialCrossAttention(embed_dims=16, num_heads=2, num_levels=2, num_points=8, dropout=0.0)
    query = torch.randn(2, 256, 16)
    features = torch.randn(2, 6, 8 * 14 + 4 * 7, 16)
    uv, visible = project_to_cameras(ref_3d, RANGE, lidar2img, (64, 112))
    batched = sca(query, features, [(8, 14), (4, 7)], uv, visible)
    for b in range(2):
        single = sca(
            query[b : b + 1], features[b : b + 1], [(8, 14), (4, 7)], uv[b : b + 1], visible[b : b + 1]
        )
        assert torch.allclose(batched[b : b + 1], single, atol=1e-5)
    # using the first sample's visibility for the second (the reference's behaviour) gives another answer
    borrowed = sca(query[1:], features[1:], [(8, 14), (4, 7)], uv[1:], visible[:1])
    assert not torch.allclose(batched[1:], borrowed, atol=1e-4)


def test_model_batch_equals_per_sample_end_to_end():
    torch.manual_seed(0)
    config = BEVFORMER_CONFIGS["bevformer_cpu"]
    model = BEVFormer(config, bev_h=12, bev_w=12, num_query=20, encoder_layers=1, decoder_layers=2).eval()
    images = torch.randn(2, 2, 6, 3, 64, 112)
    lidar2img = torch.stack([rig_matrices(0.0), rig_matrices(0.4)])[:, None].expand(-1, 2, -1, -1, -1)
    can_bus = torch.zeros(2, 2, 18)
    can_bus[0, 1, :2] = torch.tensor([2.0, 0.5])
    can_bus[0, 1, 16:] = torch.tensor([0.3, 5.0])
    can_bus[1, 1, 16] = -1.0
    prev_exists = torch.tensor([[False, True], [False, False]])
    with torch.no_grad():
        logits, codes = model(images, lidar2img, can_bus, prev_exists)
        for b in range(2):
            one_logits, one_codes = model(
                images[b : b + 1], lidar2img[b : b + 1], can_bus[b : b + 1], prev_exists[b : b + 1]
            )
            assert torch.allclose(logits[-1][b : b + 1], one_logits[-1], atol=1e-4)
            assert torch.allclose(codes[-1][b : b + 1], one_codes[-1], atol=1e-4)


def test_model_rejects_bad_shapes():
    model = BEVFormer(
        BEVFORMER_CONFIGS["bevformer_cpu"], bev_h=8, bev_w=8, num_query=10, encoder_layers=1, decoder_layers=1
    )
    images = torch.randn(1, 1, 6, 3, 64, 112)
    with pytest.raises(ValueError, match="lidar2img"):
        model(images, torch.randn(1, 1, 6, 3, 4), torch.zeros(1, 1, 18))
    with pytest.raises(ValueError, match="can_bus"):
        model(images, torch.randn(1, 1, 6, 4, 4), torch.zeros(1, 1, 17))
    with pytest.raises(ValueError, match="cameras"):
        model(images[:, :, :5], torch.randn(1, 1, 5, 4, 4), torch.zeros(1, 1, 18))
    with pytest.raises(ValueError, match=r"\(B, T, cameras"):
        model(images[0], torch.randn(1, 6, 4, 4), torch.zeros(1, 18))
