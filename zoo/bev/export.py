"""BEVFormer's inference as one exported graph per frame; the temporal queue stays in Python around it.

BEVFormer detects frame by frame: a frame's BEV is built from its cameras and from the previous frame's BEV
(aligned by the ego motion of the CAN bus), then decoded into boxes. ``FrameGraph`` is that one step with
tensors only in and out, which ``torch.export`` and ONNX take:

- inputs: ``images`` (B, cameras, 3, H, W) normalised as the data are, ``lidar2img`` (B, cameras, 4, 4),
  ``can_bus`` (B, 18) with the deltas since the previous frame (the data's layout), ``prev_bev``
  (B, bev_h * bev_w, C), and ``prev_exists`` (B,) bool: whether ``prev_bev`` is this sample's previous frame;
- outputs: the last decoder layer's ``logits`` (B, queries, classes) and ``box_codes`` (B, queries, 10), which
  ``DetectionHead.decode`` turns into boxes, and ``bev`` (B, bev_h * bev_w, C), the next frame's ``prev_bev``.

The ego-motion rotation and shift of the previous BEV are computed inside the graph from ``can_bus``
(``align_previous_bev``), so nothing else goes in. A sample without a previous frame passes any ``prev_bev``
(zeros) with ``prev_exists`` False, and the graph ignores it, as the eager model does for a first frame.
``run_queue`` is the loop around a frame graph (eager, loaded from ``.pt2``, or an ONNX session): over a
queue of frames it gives what the eager model's temporal ``forward`` gives for the queue's last frame.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from zoo.bev.model import BEVFormer
from zoo.export import ExportGraph

__all__ = ["FRAME_INPUTS", "FRAME_OUTPUTS", "FrameGraph", "frame_graph", "run_queue"]

FRAME_INPUTS = ("images", "lidar2img", "can_bus", "prev_bev", "prev_exists")
FRAME_OUTPUTS = ("logits", "box_codes", "bev")
#: the CAN-bus entries that are deltas to the previous frame (translation, yaw change in degrees)
_DELTAS = (0, 1, 2, 17)


class FrameGraph(nn.Module):
    """One BEVFormer frame: cameras + previous BEV -> last-layer logits, box codes and this frame's BEV.

    Args:
        model: the network.
        temporal: False for a detector trained without history: the graph then zeroes the CAN-bus deltas and
            ignores ``prev_bev``, as ``BEVFormerDetector(temporal=False)`` does with its queue.
    """

    def __init__(self, model: BEVFormer, temporal: bool = True) -> None:
        super().__init__()
        self.model = model
        self.temporal = temporal
        deltas = torch.zeros(model.config.can_bus_dims, dtype=torch.bool)
        deltas[list(_DELTAS)] = True
        self.register_buffer("deltas", deltas, persistent=False)

    def forward(
        self,
        images: torch.Tensor,
        lidar2img: torch.Tensor,
        can_bus: torch.Tensor,
        prev_bev: torch.Tensor,
        prev_exists: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        if not self.temporal:
            can_bus = torch.where(self.deltas, torch.zeros_like(can_bus), can_bus)
            prev_exists = torch.zeros_like(prev_exists)
        bev = self.model.bev_features(images, lidar2img, can_bus, prev_bev, prev_exists.to(torch.bool))
        logits, codes = self.model.detect(bev)
        return {"logits": logits[-1], "box_codes": codes[-1], "bev": bev}


def run_queue(
    frame: Callable[..., Sequence[torch.Tensor] | dict[str, torch.Tensor]],
    images: torch.Tensor,
    lidar2img: torch.Tensor,
    can_bus: torch.Tensor,
    prev_exists: torch.Tensor,
    bev_size: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A queue of frames (the batch layout of ``BEVFormerDetector.forward``: ``images`` (B, T, cameras, 3, H,
    W) ...) through ``frame`` one frame at a time, each frame's BEV fed to the next -> the last frame's
    ``(logits, box_codes, bev)``.

    ``frame`` takes ``FRAME_INPUTS`` positionally and returns ``FRAME_OUTPUTS`` (a tuple, or a dict as
    ``FrameGraph``); ``bev_size`` is ``(bev_h * bev_w, embed_dims)``. The first frame has no previous one.
    """
    batch, frames = images.shape[:2]
    prev = torch.zeros(batch, *bev_size, dtype=images.dtype, device=images.device)
    for t in range(frames):
        exists = prev_exists[:, t] if t > 0 else torch.zeros_like(prev_exists[:, 0])
        out = frame(images[:, t], lidar2img[:, t], can_bus[:, t], prev, exists)
        if isinstance(out, dict):
            out = tuple(out[name] for name in FRAME_OUTPUTS)
        logits, codes, prev = (torch.as_tensor(value) for value in out)
    return logits, codes, prev


def frame_graph(detector) -> ExportGraph:
    """The ``ExportGraph`` of a ``BEVFormerDetector``'s frame, with a dynamic batch.

    Traced on the second frame of ``example_inputs(2)`` with the first frame's BEV as ``prev_bev`` (the ego
    2 m further on); checked on three samples with other ego motions (yaw changes of +3 and -5 degrees),
    one of them a first frame, and another sample's camera matrices shifted.
    """
    model = detector.model
    graph = FrameGraph(model, temporal=detector.hparams.temporal).eval()

    def inputs(batch: int) -> tuple[torch.Tensor, ...]:
        images, lidar2img, can_bus, prev_exists = detector.example_inputs(batch)
        if batch > 2:
            can_bus[:, 1, 16] = torch.linspace(-0.5, 0.5, batch, device=can_bus.device)
            can_bus[:, 1, 17] = torch.linspace(3.0, -5.0, batch, device=can_bus.device)
            prev_exists[1, 1] = False
            lidar2img[-1, 1, :, 0, 3] += 4.0  # another calibration: the image shifted sideways
        config = model.config
        nothing = torch.zeros(batch, config.bev_h * config.bev_w, config.embed_dims, device=images.device)
        with torch.no_grad():  # the first frame's BEV, as the previous one of the second
            first = graph(images[:, 0], lidar2img[:, 0], can_bus[:, 0], nothing, prev_exists[:, 0])
        return images[:, 1], lidar2img[:, 1], can_bus[:, 1], first["bev"], prev_exists[:, 1]

    return ExportGraph(
        name="frame",
        module=graph,
        inputs=inputs(2),
        check_inputs=inputs(3),
        input_names=FRAME_INPUTS,
        output_names=FRAME_OUTPUTS,
        dynamic_dims=tuple({0: "batch"} for _ in FRAME_INPUTS),
    )
