"""Detection head: box coding, classification/regression branches, Hungarian matching, losses, decoding.

Box code (10 values, BEVFormer's quantities in the order ``x, y, z, log w, log l, log h, sin yaw, cos yaw,
vx, vy``): centres in metres (the head predicts them as a sigmoid over the BEV range, refined from the
query's reference point), log sizes, yaw as sine and cosine, velocity in m/s. Matching and losses follow
BEVFormer: cost = 2 x focal cost + 0.25 x L1 over the first 8 code values (velocity excluded), solved with
``scipy.optimize.linear_sum_assignment``; loss per decoder layer = 2 x sigmoid focal loss (gamma 2, alpha
0.25) averaged over matched boxes + 0.25 x L1 on matched codes with weights (1, ..., 1, 0.2, 0.2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zoo.bev.decoder import inverse_sigmoid
from zoo.extras import require

__all__ = ["DetectionHead", "decode_boxes", "encode_boxes", "hungarian_match", "sigmoid_focal_loss"]

CODE_SIZE = 10


def encode_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """(M, 9) x, y, z, w, l, h, yaw, vx, vy -> (M, 10) code."""
    if boxes.shape[-1] != 9:
        raise ValueError(f"boxes must have 9 values (x, y, z, w, l, h, yaw, vx, vy), got {boxes.shape[-1]}")
    dims = boxes[..., 3:6].clamp(min=1e-3).log()
    yaw = boxes[..., 6:7]
    return torch.cat([boxes[..., 0:3], dims, yaw.sin(), yaw.cos(), boxes[..., 7:9]], -1)


def decode_boxes(code: torch.Tensor) -> torch.Tensor:
    """(..., 10) code -> (..., 9) boxes."""
    yaw = torch.atan2(code[..., 6:7], code[..., 7:8])
    return torch.cat([code[..., 0:3], code[..., 3:6].exp(), yaw, code[..., 8:10]], -1)


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0, alpha: float = 0.25):
    """Summed sigmoid focal loss (RetinaNet's), ``targets`` one-hot of the same shape as ``logits``."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    weight = alpha * targets + (1 - alpha) * (1 - targets)
    return (weight * (1 - p_t) ** gamma * ce).sum()


def _focal_cost(logits: torch.Tensor, labels: torch.Tensor, gamma: float = 2.0, alpha: float = 0.25):
    p = logits.sigmoid()
    neg = -(1 - p + 1e-12).log() * (1 - alpha) * p**gamma
    pos = -(p + 1e-12).log() * alpha * (1 - p) ** gamma
    return (pos - neg)[:, labels]


@torch.no_grad()
def hungarian_match(
    logits: torch.Tensor, codes: torch.Tensor, labels: torch.Tensor, target_codes: torch.Tensor,
    cls_weight: float = 2.0, reg_weight: float = 0.25,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One sample: (query indices, target indices) minimising focal + L1 (first 8 code values) cost."""
    if len(labels) == 0:
        empty = torch.zeros(0, dtype=torch.long, device=logits.device)
        return empty, empty
    cost = cls_weight * _focal_cost(logits.float(), labels) + reg_weight * torch.cdist(
        codes[:, :8].float(), target_codes[:, :8].float(), p=1
    )
    optimize = require("scipy.optimize", "bev", "BEVFormer's Hungarian matching")
    rows, cols = optimize.linear_sum_assignment(torch.nan_to_num(cost, nan=1e6).cpu().numpy())
    device = logits.device
    return torch.as_tensor(rows, dtype=torch.long, device=device), torch.as_tensor(
        cols, dtype=torch.long, device=device
    )


class DetectionHead(nn.Module):
    """Per decoder layer: a classification and a regression branch (independent copies, box refinement).

    Args:
        embed_dims, num_classes, num_layers: widths and counts.
        point_cloud_range: (6,) metres; centres are predicted inside it.
        code_weights: L1 weights of the 10 code values.
    """

    def __init__(
        self,
        embed_dims: int,
        num_classes: int,
        num_layers: int,
        point_cloud_range: Sequence[float],
        code_weights: Sequence[float] = (1, 1, 1, 1, 1, 1, 1, 1, 0.2, 0.2),
        cls_weight: float = 2.0,
        reg_weight: float = 0.25,
    ) -> None:
        super().__init__()
        self.num_classes, self.cls_weight, self.reg_weight = num_classes, cls_weight, reg_weight
        self.cls_branches = nn.ModuleList(
            nn.Sequential(
                nn.Linear(embed_dims, embed_dims),
                nn.LayerNorm(embed_dims),
                nn.ReLU(inplace=True),
                nn.Linear(embed_dims, embed_dims),
                nn.LayerNorm(embed_dims),
                nn.ReLU(inplace=True),
                nn.Linear(embed_dims, num_classes),
            )
            for _ in range(num_layers)
        )
        self.reg_branches = nn.ModuleList(
            nn.Sequential(
                nn.Linear(embed_dims, embed_dims),
                nn.ReLU(inplace=True),
                nn.Linear(embed_dims, embed_dims),
                nn.ReLU(inplace=True),
                nn.Linear(embed_dims, CODE_SIZE),
            )
            for _ in range(num_layers)
        )
        # a non-trainable parameter in BEVFormer (so it is in the state dict); a buffer here
        self.register_buffer("code_weights", torch.tensor(code_weights, dtype=torch.float32))
        self.register_buffer(
            "pc_range", torch.tensor(point_cloud_range, dtype=torch.float32), persistent=False
        )
        for branch in self.cls_branches:
            nn.init.constant_(branch[-1].bias, -4.595)  # prior probability 0.01

    def forward(self, outputs: list[torch.Tensor], references: list[torch.Tensor]):
        """Per layer: class logits (B, Q, classes) and box codes (B, Q, 10) with centres in metres."""
        logits, codes = [], []
        low, high = self.pc_range[:3], self.pc_range[3:]
        for query, reference, cls_branch, reg_branch in zip(
            outputs, references, self.cls_branches, self.reg_branches
        ):
            delta = reg_branch(query)
            centre = (delta[..., 0:3] + inverse_sigmoid(reference)).sigmoid() * (high - low) + low
            codes.append(torch.cat([centre, delta[..., 3:]], -1))
            logits.append(cls_branch(query))
        return logits, codes

    def loss(
        self, logits: list[torch.Tensor], codes: list[torch.Tensor], gt_boxes: list[torch.Tensor],
        gt_labels: list[torch.Tensor],
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        """Summed over decoder layers; ``loss_cls``/``loss_bbox`` of the last layer are reported too."""
        target_codes = [encode_boxes(b.to(codes[0].dtype)) for b in gt_boxes]
        num_pos = max(sum(len(labels) for labels in gt_labels), 1)
        losses = {}
        total = logits[0].new_zeros(())
        for layer, (layer_logits, layer_codes) in enumerate(zip(logits, codes)):
            targets = torch.zeros_like(layer_logits)
            pred_matched, target_matched = [], []
            for b, labels in enumerate(gt_labels):
                rows, cols = hungarian_match(layer_logits[b], layer_codes[b], labels, target_codes[b])
                targets[b, rows, labels[cols]] = 1.0
                pred_matched.append(layer_codes[b, rows])
                target_matched.append(target_codes[b][cols])
            loss_cls = self.cls_weight * sigmoid_focal_loss(layer_logits.float(), targets.float()) / num_pos
            diff = (torch.cat(pred_matched) - torch.cat(target_matched)).abs() * self.code_weights
            loss_bbox = self.reg_weight * torch.nan_to_num(diff).sum() / num_pos
            total = total + loss_cls + loss_bbox
            prefix = "" if layer == len(logits) - 1 else f"d{layer}."
            losses[f"{prefix}loss_cls"] = loss_cls.detach()
            losses[f"{prefix}loss_bbox"] = loss_bbox.detach()
        losses["loss"] = total
        return losses

    @torch.no_grad()
    def decode(
        self, logits: torch.Tensor, codes: torch.Tensor, max_detections: int = 300, score_threshold: float = 0.0,
        post_center_range: Sequence[float] | None = None,
    ) -> list[dict[str, torch.Tensor]]:  # fmt: skip
        """Last-layer outputs -> per sample ``{"boxes" (K, 9), "scores" (K,), "labels" (K,)}``.

        Top-``max_detections`` over all (query, class) scores, as BEVFormer's NMS-free coder, then the score
        threshold and the centre-range filter.
        """
        results = []
        num_classes = logits.shape[-1]
        for sample_logits, sample_codes in zip(logits, codes):
            # float32: a bf16 sigmoid keeps 3 significant digits and ties scores that top-k must tell apart
            scores = sample_logits.float().sigmoid().flatten()
            k = min(max_detections, scores.numel())
            scores, index = scores.topk(k)
            labels, query = index % num_classes, index // num_classes
            boxes = decode_boxes(sample_codes[query].float())
            keep = scores >= score_threshold
            if post_center_range is not None:
                r = torch.tensor(post_center_range, device=boxes.device)
                keep &= ((boxes[:, :3] >= r[:3]) & (boxes[:, :3] <= r[3:])).all(-1)
            results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return results
