"""The nuScenes detection metrics (mAP, TP errors, NDS) as a torchmetrics ``Metric``.

The definitions are the nuScenes devkit's (``detection_cvpr_2019``), reproduced step for step so the
numbers agree with it (``tests/bev/test_metrics.py`` compares against the devkit's own functions):

- boxes farther from the ego than their class range are dropped (predictions and ground truth alike);
- per class and centre-distance threshold (0.5, 1, 2, 4 m, on the ground plane), predictions are taken by
  descending score (ties: later ones first, as the devkit sorts) and each is matched greedily to the
  nearest unmatched ground-truth box of its class in its sample, a true positive if nearer than the
  threshold; precision is interpolated at 101 recall points (0 beyond the highest recall reached);
- AP = mean of ``max(precision - 0.1, 0)`` over recalls above 0.1, divided by 0.9;
- at the 2 m threshold, each true-positive error (translation m, scale 1 - aligned 3D IoU, orientation
  rad (period pi for barriers), velocity m/s, attribute 1 - accuracy) is a cumulative mean over the
  matches in score order, resampled at the same recall points by confidence, and averaged over recalls
  from 0.1 to the highest reached (1 if that is below 0.1); orientation, velocity and attribute errors
  are not defined for traffic cones, velocity and attribute errors not for barriers;
- mAP = mean over classes and thresholds; each mTP = nan-mean over classes; NDS =
  ``(5 mAP + sum(1 - min(1, mTP))) / 10``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torchmetrics import Metric

__all__ = [
    "ATTRIBUTE_NAMES",
    "NUSCENES_CLASS_RANGES",
    "TP_METRICS",
    "NuScenesDetectionMetric",
    "default_attributes",
]

#: nuScenes detection eval radius per class (metres from the ego).
NUSCENES_CLASS_RANGES = {
    "car": 50.0, "truck": 50.0, "bus": 50.0, "trailer": 50.0, "construction_vehicle": 50.0,
    "pedestrian": 40.0, "motorcycle": 40.0, "bicycle": 40.0, "traffic_cone": 30.0, "barrier": 30.0,
}  # fmt: skip
TP_METRICS = {
    "trans_err": "mATE",
    "scale_err": "mASE",
    "orient_err": "mAOE",
    "vel_err": "mAVE",
    "attr_err": "mAAE",
}
#: nuScenes attribute names; an attribute index (-1: none) points into this tuple.
ATTRIBUTE_NAMES = (
    "cycle.with_rider", "cycle.without_rider", "pedestrian.moving", "pedestrian.sitting_lying_down",
    "pedestrian.standing", "vehicle.moving", "vehicle.parked", "vehicle.stopped",
)  # fmt: skip
_VEHICLES = ("car", "truck", "bus", "trailer", "construction_vehicle")
_RECALLS = 101


def default_attributes(labels: torch.Tensor, boxes: torch.Tensor, class_names: Sequence[str]) -> torch.Tensor:
    """Attributes from speed, by mmdet3d's rule for BEVFormer's submissions (-1: the class has none).

    Above 0.2 m/s vehicles are ``moving`` and cycles ``with_rider``; below it pedestrians are ``standing``,
    buses ``stopped``; otherwise the class default (vehicles ``parked``, buses ``moving``, cycles
    ``without_rider``, pedestrians ``moving``).
    """
    speed = torch.linalg.vector_norm(boxes[:, 7:9].float(), dim=-1) if len(boxes) else boxes.new_zeros(0)
    out = []
    for label, moving in zip(labels.tolist(), (speed > 0.2).tolist()):
        name = class_names[label]
        if name in _VEHICLES:
            attr = "vehicle.moving" if moving else ("vehicle.stopped" if name == "bus" else "vehicle.parked")
        elif name in ("bicycle", "motorcycle"):
            attr = "cycle.with_rider" if moving else "cycle.without_rider"
        elif name == "pedestrian":
            attr = "pedestrian.moving" if moving else "pedestrian.standing"
        else:
            attr = None
        out.append(ATTRIBUTE_NAMES.index(attr) if attr else -1)
    return torch.tensor(out, dtype=torch.long, device=labels.device)


def _cummean(x: np.ndarray) -> np.ndarray:
    if np.isnan(x).all():
        return np.ones(len(x))
    sums = np.nancumsum(x.astype(float))
    counts = np.cumsum(~np.isnan(x))
    return np.divide(sums, counts, out=np.zeros_like(sums), where=counts != 0)


def _angle_diff(a: np.ndarray, b: float, period: float) -> np.ndarray:
    diff = (a - b + period / 2) % period - period / 2
    return np.where(diff > np.pi, diff - 2 * np.pi, diff)


def _scale_iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.prod(np.minimum(a, b))
    return float(inter / (np.prod(a) + np.prod(b) - inter))


def _accumulate(gt: dict, pred: dict, label: int, threshold: float, period: float) -> dict | None:
    """The devkit's ``accumulate`` for one class and threshold; None where it returns ``no_predictions``."""
    gt_mask = gt["labels"] == label
    npos = int(gt_mask.sum())
    if npos == 0:
        return None
    pm = pred["labels"] == label
    scores, samples, boxes, attrs = (
        pred["scores"][pm],
        pred["samples"][pm],
        pred["boxes"][pm],
        pred["attrs"][pm],
    )
    order = np.lexsort((-np.arange(len(scores)), -scores))  # descending score, ties: later first
    gt_index = np.flatnonzero(gt_mask)
    by_sample: dict[int, np.ndarray] = {}
    for s in np.unique(gt["samples"][gt_index]):
        by_sample[int(s)] = gt_index[gt["samples"][gt_index] == s]
    taken = np.zeros(len(gt["labels"]), dtype=bool)
    tp = np.zeros(len(order))
    errors = {k: [] for k in TP_METRICS}
    match_conf = []
    for rank, i in enumerate(order):
        candidates = by_sample.get(int(samples[i]))
        if candidates is None:
            continue
        free = candidates[~taken[candidates]]
        if len(free) == 0:
            continue
        dists = np.linalg.norm(gt["boxes"][free, :2] - boxes[i, :2], axis=1)
        j = int(np.argmin(dists))
        if not dists[j] < threshold:
            continue
        g = free[j]
        taken[g] = True
        tp[rank] = 1
        match_conf.append(scores[i])
        gbox = gt["boxes"][g]
        errors["trans_err"].append(dists[j])
        errors["vel_err"].append(np.linalg.norm(boxes[i, 7:9] - gbox[7:9]))
        errors["scale_err"].append(1 - _scale_iou(gbox[3:6], boxes[i, 3:6]))
        errors["orient_err"].append(abs(float(_angle_diff(gbox[6], boxes[i, 6], period))))
        gt_attr = gt["attrs"][g]
        errors["attr_err"].append(np.nan if gt_attr < 0 else 1.0 - float(gt_attr == attrs[i]))
    if not match_conf:
        return None
    tp_cum = np.cumsum(tp)
    fp_cum = np.cumsum(1 - tp)
    conf = scores[order]
    precision = tp_cum / (fp_cum + tp_cum)
    recall = tp_cum / npos
    grid = np.linspace(0, 1, _RECALLS)
    precision = np.interp(grid, recall, precision, right=0)
    conf = np.interp(grid, recall, conf, right=0)
    out = {"precision": precision, "confidence": conf}
    match_conf = np.asarray(match_conf)
    for key, values in errors.items():
        cum = _cummean(np.asarray(values, dtype=float))
        out[key] = np.interp(conf[::-1], match_conf[::-1], cum[::-1])[::-1]
    return out


class NuScenesDetectionMetric(Metric):
    """nuScenes mAP, mATE/mASE/mAOE/mAVE/mAAE and NDS over a set of samples.

    ``update(preds, targets)``: lists with one dict per sample; ``boxes`` (N, 9) ``x, y, z, w, l, h, yaw,
    vx, vy`` in the ego frame (metres, radians, m/s), ``labels`` (N,) indices into ``class_names``, for
    predictions ``scores`` (N,); optional ``attributes`` (N,) nuScenes attribute indices (-1 none), derived
    from speed by ``default_attributes`` where absent. ``compute()`` returns ``mAP``, ``NDS``, the five mTP
    errors and ``AP_<class>``. Works under DDP: per-box states are concatenated across ranks.

    Args:
        class_names: the classes, in label order.
        class_ranges: evaluation radius per class (default nuScenes'); classes without one are not filtered.
        dist_thresholds, tp_threshold, min_recall, min_precision: the devkit's ``detection_cvpr_2019`` values.
        max_boxes_per_sample: the devkit rejects submissions with more; checked in ``update``.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(
        self,
        class_names: Sequence[str],
        class_ranges: dict[str, float] | None = None,
        dist_thresholds: Sequence[float] = (0.5, 1.0, 2.0, 4.0),
        tp_threshold: float = 2.0,
        min_recall: float = 0.1,
        min_precision: float = 0.1,
        max_boxes_per_sample: int = 500,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.class_names = list(class_names)
        ranges = NUSCENES_CLASS_RANGES if class_ranges is None else class_ranges
        self.class_ranges = [float(ranges.get(name, np.inf)) for name in self.class_names]
        self.dist_thresholds = tuple(dist_thresholds)
        self.tp_threshold, self.min_recall, self.min_precision = tp_threshold, min_recall, min_precision
        self.max_boxes_per_sample = max_boxes_per_sample
        for prefix in ("pred", "gt"):
            for name in ("boxes", "labels", "attrs", "samples"):
                self.add_state(f"{prefix}_{name}", default=[], dist_reduce_fx="cat")
        self.add_state("pred_scores", default=[], dist_reduce_fx="cat")
        self._seen = 0

    def _check(self, item: dict, where: str, need_scores: bool) -> None:
        boxes, labels = item.get("boxes"), item.get("labels")
        if boxes is None or labels is None or (need_scores and "scores" not in item):
            keys = "'boxes', 'labels'" + (", 'scores'" if need_scores else "")
            raise ValueError(f"{where} needs {keys}; got keys {sorted(item)}")
        if boxes.dim() != 2 or boxes.shape[1] != 9 or len(labels) != len(boxes):
            raise ValueError(
                f"{where}: boxes must be (N, 9) with N labels, got {tuple(boxes.shape)} and {len(labels)}"
            )
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(self.class_names)):
            raise ValueError(f"{where}: labels must lie in [0, {len(self.class_names)})")

    def update(self, preds: list[dict], targets: list[dict]) -> None:
        if len(preds) != len(targets):
            raise ValueError(f"{len(preds)} predictions but {len(targets)} targets: one dict per sample each")
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        for n, (pred, target) in enumerate(zip(preds, targets)):
            self._check(pred, f"preds[{n}]", need_scores=True)
            self._check(target, f"targets[{n}]", need_scores=False)
            if len(pred["boxes"]) > self.max_boxes_per_sample:
                raise ValueError(f"preds[{n}] has {len(pred['boxes'])} boxes; nuScenes allows at most "
                                 f"{self.max_boxes_per_sample} per sample")  # fmt: skip
            sample = self._seen * world + rank  # unique across ranks once the states are concatenated
            self._seen += 1
            for prefix, item in (("pred", pred), ("gt", target)):
                boxes, labels = item["boxes"].detach().double(), item["labels"].detach().long()
                attrs = item.get("attributes")
                if attrs is None:
                    attrs = default_attributes(labels, boxes, self.class_names)
                getattr(self, f"{prefix}_boxes").append(boxes.reshape(-1, 9))
                getattr(self, f"{prefix}_labels").append(labels.reshape(-1))
                getattr(self, f"{prefix}_attrs").append(attrs.detach().long().reshape(-1).to(labels.device))
                getattr(self, f"{prefix}_samples").append(torch.full_like(labels.reshape(-1), sample))
            self.pred_scores.append(pred["scores"].detach().double().reshape(-1))

    def _gather(self, prefix: str) -> dict[str, np.ndarray]:
        def cat(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
            value = getattr(self, f"{prefix}_{name}")
            if isinstance(value, list):
                value = torch.cat(value) if value else torch.zeros(shape, dtype=dtype)
            return value.cpu().numpy()

        out = {
            "boxes": cat("boxes", (0, 9), torch.float64).reshape(-1, 9),
            "labels": cat("labels", (0,), torch.long),
            "attrs": cat("attrs", (0,), torch.long),
            "samples": cat("samples", (0,), torch.long),
        }
        if prefix == "pred":
            out["scores"] = cat("scores", (0,), torch.float64)
        radius = np.hypot(out["boxes"][:, 0], out["boxes"][:, 1])
        keep = (
            radius <= np.asarray(self.class_ranges)[out["labels"]] if len(radius) else np.zeros(0, dtype=bool)
        )
        return {k: v[keep] for k, v in out.items()}

    def compute(self) -> dict[str, torch.Tensor]:
        gt, pred = self._gather("gt"), self._gather("pred")
        first = round(100 * self.min_recall) + 1
        aps, tp_errors = [], {k: [] for k in TP_METRICS}
        results: dict[str, float] = {}
        for label, name in enumerate(self.class_names):
            period = np.pi if name == "barrier" else 2 * np.pi
            class_aps = []
            for threshold in self.dist_thresholds:
                md = _accumulate(gt, pred, label, threshold, period)
                precision = md["precision"][first:] if md is not None else np.zeros(_RECALLS - first)
                precision = np.clip(precision - self.min_precision, 0, None)
                class_aps.append(float(np.mean(precision)) / (1.0 - self.min_precision))
            results[f"AP_{name}"] = float(np.mean(class_aps))
            aps.append(results[f"AP_{name}"])
            md = _accumulate(gt, pred, label, self.tp_threshold, period)
            for key in TP_METRICS:
                if (name == "traffic_cone" and key in ("attr_err", "vel_err", "orient_err")) or (
                    name == "barrier" and key in ("attr_err", "vel_err")
                ):
                    tp_errors[key].append(np.nan)
                    continue
                if md is None:
                    tp_errors[key].append(1.0)
                    continue
                nonzero = np.flatnonzero(md["confidence"])
                last = int(nonzero[-1]) if len(nonzero) else 0
                tp_errors[key].append(1.0 if last < first else float(np.mean(md[key][first : last + 1])))
        results["mAP"] = float(np.mean(aps))
        score = 5.0 * results["mAP"]
        for key, short in TP_METRICS.items():
            errors = np.asarray(tp_errors[key], dtype=float)
            results[short] = float(np.nanmean(errors)) if not np.isnan(errors).all() else float("nan")
            score += max(0.0, 1.0 - results[short]) if not np.isnan(results[short]) else 0.0
        results["NDS"] = score / (5.0 + len(TP_METRICS))
        return {k: torch.tensor(v, dtype=torch.float32) for k, v in results.items()}

    def reset(self) -> None:
        super().reset()
        self._seen = 0
