"""BEVFormer exported as one frame graph (cameras, CAN bus and the previous BEV in; logits, box codes and the
new BEV out): each format matches the eager frame on two batch sizes, and the exported frame run over a
two-frame queue in Python, its BEV fed forward, gives what the eager model's temporal forward gives."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import CONFIGS
from zoo.bev import BEVFormerDetector
from zoo.bev.export import FRAME_INPUTS, FrameGraph, run_queue
from zoo.export import export_model
from zoo.export import main as zoo_export

SMALL_MODEL = {"num_query": 20, "bev_h": 12, "bev_w": 12, "encoder_layers": 1, "decoder_layers": 2}
TOLERANCE = 1e-4


def detector(temporal: bool = True) -> BEVFormerDetector:
    torch.manual_seed(0)
    return BEVFormerDetector(model_kwargs=SMALL_MODEL, temporal=temporal).eval()


def two_frames(model: BEVFormerDetector) -> tuple[torch.Tensor, ...]:
    """Three samples of two frames: the ego turning left, turning right, and one whose second frame starts a
    new scene (no previous BEV; its CAN-bus deltas zero, as the data make them)."""
    images, lidar2img, can_bus, prev_exists = model.example_inputs(3)
    can_bus[:, 1, 16] = torch.tensor([0.3, -0.2, 1.0])
    can_bus[:, 1, 17] = torch.tensor([6.0, -4.0, 0.0])
    can_bus[2, 1, :3] = 0.0
    prev_exists[2, 1] = False
    return images, lidar2img, can_bus, prev_exists


def bev_size(model: BEVFormerDetector) -> tuple[int, int]:
    config = model.model.config
    return config.bev_h * config.bev_w, config.embed_dims


def assert_loop_equals_forward(model: BEVFormerDetector, frame) -> dict[str, float]:
    queue = two_frames(model)
    with torch.no_grad():
        logits, codes = model(*queue)
        got = run_queue(frame, *queue, bev_size(model))
    differences = {
        "logits": (got[0] - logits[-1]).abs().max().item(),
        "box_codes": (got[1] - codes[-1]).abs().max().item(),
    }
    assert max(differences.values()) <= TOLERANCE, differences
    return differences


@pytest.mark.parametrize("temporal", [True, False])
def test_the_eager_frame_loop_is_the_temporal_forward(temporal, single_thread):
    model = detector(temporal)
    differences = assert_loop_equals_forward(model, FrameGraph(model.model, temporal).eval())
    assert max(differences.values()) <= 1e-5


def test_zoo_export_pt2_frame_matches_and_loops_over_frames(tmp_path, single_thread):
    model = detector()
    checkpoint = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    zoo_export([
        "--config", str(CONFIGS / "bev" / "bevformer_cpu.yaml"), f"--model.init_args.model_kwargs={json.dumps(SMALL_MODEL)}",
        "--ckpt_path", str(checkpoint), "--format", "pt2", "--output", str(tmp_path / "export"),
    ])  # fmt: skip
    manifest = json.loads((tmp_path / "export" / "export.json").read_text())
    (entry,) = manifest["graphs"]
    assert entry["graph"] == "frame" and entry["file"] == "frame.pt2"
    assert [i["name"] for i in entry["inputs"]] == list(FRAME_INPUTS)
    assert all(i["shape"][0] == "batch" for i in entry["inputs"])  # a dynamic batch
    assert max(entry["max_abs_difference"].values()) <= TOLERANCE
    frame = torch.export.load(tmp_path / "export" / "frame.pt2").module()
    assert_loop_equals_forward(model, frame)  # batch 3, where the graph was traced with 2


def test_onnx_frame_matches_and_loops_over_frames(tmp_path, single_thread):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = detector()
    (entry,) = export_model(model, tmp_path, "onnx")
    assert max(entry["max_abs_difference"].values()) <= TOLERANCE
    session = ort.InferenceSession(str(tmp_path / "frame.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(FRAME_INPUTS)

    def frame(*inputs: torch.Tensor) -> list:
        return session.run(None, {name: x.numpy() for name, x in zip(FRAME_INPUTS, inputs)})

    assert_loop_equals_forward(model, frame)
