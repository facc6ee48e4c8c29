"""Box coding, focal loss, Hungarian matching and decoding."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss as torchvision_focal

from zoo.bev.head import DetectionHead, decode_boxes, encode_boxes, hungarian_match, sigmoid_focal_loss


def test_box_code_round_trip():
    boxes = torch.tensor(
        [[1.0, -2.0, 0.5, 1.9, 4.5, 1.6, 2.5, 3.0, -1.0], [0, 0, 1, 0.5, 0.5, 1.8, -math.pi + 0.1, 0, 0]]
    )
    code = encode_boxes(boxes)
    assert code.shape == (2, 10)
    assert torch.allclose(code[:, 3:6], boxes[:, 3:6].log())
    assert torch.allclose(decode_boxes(code), boxes, atol=1e-6)
    with pytest.raises(ValueError, match="9 values"):
        encode_boxes(torch.zeros(2, 7))


def test_focal_loss_matches_torchvision():
    torch.manual_seed(0)
    logits = torch.randn(4, 7, 5)
    targets = (torch.rand(4, 7, 5) > 0.8).float()
    assert torch.allclose(
        sigmoid_focal_loss(logits, targets), torchvision_focal(logits, targets, reduction="sum")
    )


def test_hungarian_match_recovers_a_permutation():
    torch.manual_seed(0)
    targets = encode_boxes(torch.tensor([[5.0, 5, 1, 2, 4, 1.5, 0, 0, 0], [-5, 3, 1, 1, 1, 1.7, 1, 0, 0],
                                         [0, -9, 1, 2.5, 7, 3, 2, 0, 0]]))  # fmt: skip
    labels = torch.tensor([0, 1, 0])
    order = torch.tensor([3, 0, 5])  # target i is predicted by query order[i]
    codes = torch.randn(6, 10) * 5
    codes[order] = targets
    logits = torch.full((6, 2), -3.0)
    logits[order, labels] = 3.0
    rows, cols = hungarian_match(logits, codes, labels, targets)
    assert dict(zip(cols.tolist(), rows.tolist())) == {0: 3, 1: 0, 2: 5}
    empty = hungarian_match(logits, codes, labels[:0], targets[:0])
    assert len(empty[0]) == len(empty[1]) == 0


def test_loss_is_low_for_matched_predictions_and_decode_filters():
    head = DetectionHead(16, num_classes=3, num_layers=1, point_cloud_range=(-10, -10, -2, 10, 10, 2))
    boxes = torch.tensor([[2.0, 3.0, 0.5, 2, 4, 1.5, 0.3, 1.0, 0.0]])
    codes = torch.zeros(1, 4, 10)
    codes[0, 2] = encode_boxes(boxes)[0]
    logits = torch.full((1, 4, 3), -8.0)
    logits[0, 2, 1] = 8.0
    good = head.loss([logits], [codes], [boxes], [torch.tensor([1])])
    bad = head.loss([logits.roll(1, dims=1)], [codes.roll(1, dims=1) + 1], [boxes], [torch.tensor([1])])
    assert good["loss"] < 1e-3 < bad["loss"]
    assert set(good) == {"loss", "loss_cls", "loss_bbox"}
    decoded = head.decode(logits, codes, max_detections=2, score_threshold=0.5)[0]
    assert decoded["labels"].tolist() == [1] and torch.allclose(decoded["boxes"], boxes, atol=1e-5)
    assert len(head.decode(logits, codes, max_detections=5)[0]["scores"]) == 5
    far = codes.clone()
    far[0, 2, 0] = 100.0
    assert (
        len(
            head.decode(logits, far, max_detections=1, post_center_range=(-20, -20, -5, 20, 20, 5))[0][
                "boxes"
            ]
        )
        == 0
    )
