"""NuScenesDetectionMetric: hand-computed cases, and agreement with the nuScenes devkit's own functions."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from zoo.bev.metrics import NuScenesDetectionMetric, default_attributes


def box(x, y, w=2.0, l=4.0, h=1.5, yaw=0.0, vx=0.0, vy=0.0, z=0.75):  # noqa: E741
    return [x, y, z, w, l, h, yaw, vx, vy]


def sample(boxes, labels, scores=None):
    out = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 9), "labels": torch.tensor(labels)}
    if scores is not None:
        out["scores"] = torch.tensor(scores, dtype=torch.float32)
    return out


def test_perfect_predictions_score_one():
    gts = [sample([box(5, 3, vx=2.0), box(-8, 10, w=0.7, l=0.7, h=1.8)], [0, 1]), sample([box(0, -12)], [0])]
    preds = [dict(g, scores=torch.tensor([0.9, 0.8])[: len(g["labels"])]) for g in gts]
    metric = NuScenesDetectionMetric(["car", "pedestrian"])
    metric.update(preds, gts)
    out = metric.compute()
    assert out["mAP"] == pytest.approx(1.0)
    for key in ("mATE", "mASE", "mAOE", "mAVE", "mAAE"):
        assert out[key] == pytest.approx(0.0, abs=1e-6)
    assert out["NDS"] == pytest.approx(1.0)


def test_hand_computed_single_match():
    """2 cars, one found 0.5 m off: recall 0.5; AP 0 at 0.5 m (not strictly nearer), 40/90 at 1, 2, 4 m."""
    gt = sample([box(10, 0, vx=1.0), box(-10, 5)], [0])
    gt["labels"] = torch.tensor([0, 0])
    pred = sample([box(10.3, 0.4, h=0.75, yaw=0.3, vx=1.0, vy=0.5)], [0], [0.9])
    metric = NuScenesDetectionMetric(["car"])
    metric.update([pred], [gt])
    out = metric.compute()
    ap = 0.75 * (40 * 0.9 / 90) / 0.9
    assert out["AP_car"] == pytest.approx(ap)
    assert out["mAP"] == pytest.approx(ap)
    assert out["mATE"] == pytest.approx(0.5, abs=1e-6)
    assert out["mASE"] == pytest.approx(0.5, abs=1e-6)  # half the height, same footprint: IoU 0.5
    assert out["mAOE"] == pytest.approx(0.3, abs=1e-6)
    assert out["mAVE"] == pytest.approx(0.5, abs=1e-6)
    assert out["mAAE"] == pytest.approx(0.0)  # both moving -> vehicle.moving
    nds = (5 * ap + 0.5 + 0.5 + 0.7 + 0.5 + 1.0) / 10
    assert out["NDS"] == pytest.approx(nds, abs=1e-6)


def test_barrier_and_cone_exclusions_and_class_range():
    gts = sample([box(5, 0, vx=3.0), box(0, 5, yaw=0.2), box(40, 0)], [0, 1, 0])
    # the barrier predicted turned by pi (no error, period pi) and with a wrong velocity (not evaluated)
    preds = sample(
        [box(5, 0, vx=2.0), box(0, 5, yaw=0.2 + math.pi, vx=9.0), box(40, 0)], [0, 1, 0], [0.9, 0.8, 0.7]
    )
    metric = NuScenesDetectionMetric(["car", "barrier"], class_ranges={"car": 30.0, "barrier": 30.0})
    metric.update([preds], [gts])
    out = metric.compute()
    assert out["mAP"] == pytest.approx(1.0)  # the car at 40 m is outside the range, predicted and true alike
    assert out["mAOE"] == pytest.approx(0.0, abs=1e-6)
    assert out["mAVE"] == pytest.approx(1.0, abs=1e-6)  # only the car's 1 m/s counts


def test_default_attributes_follow_mmdet3d_rule():
    boxes = torch.tensor([box(0, 0, vx=1.0), box(0, 0), box(0, 0), box(0, 0, vx=0.1), box(0, 0)])
    attrs = default_attributes(torch.tensor([0, 0, 1, 2, 3]), boxes, ["car", "bus", "pedestrian", "barrier"])
    # car moving, car parked, bus stopped, pedestrian standing, barrier none
    assert attrs.tolist() == [5, 6, 7, 4, -1]


def test_bad_inputs_are_named():
    metric = NuScenesDetectionMetric(["car"])
    with pytest.raises(ValueError, match="scores"):
        metric.update([sample([box(0, 0)], [0])], [sample([box(0, 0)], [0])])
    with pytest.raises(ValueError, match=r"boxes must be \(N, 9\)"):
        metric.update([{"boxes": torch.zeros(1, 7), "labels": torch.zeros(1, dtype=torch.long), "scores": torch.ones(1)}],
                      [sample([box(0, 0)], [0])])  # fmt: skip
    with pytest.raises(ValueError, match="labels must lie"):
        metric.update([sample([box(0, 0)], [3], [0.5])], [sample([box(0, 0)], [0])])
    with pytest.raises(ValueError, match="one dict per sample"):
        metric.update([], [sample([box(0, 0)], [0])])


# ------------------------------------------------------------------------------------- the devkit
@pytest.fixture
def devkit(monkeypatch):
    """The devkit's detection algorithm modules, loaded without its rendering stack (cv2, matplotlib):
    ``pip install --no-deps nuscenes-devkit pyquaternion`` is enough."""
    spec = importlib.util.find_spec("nuscenes")
    if spec is None or importlib.util.find_spec("pyquaternion") is None:
        pytest.skip("nuscenes-devkit (and pyquaternion) not installed")
    root = spec.submodule_search_locations[0]
    before = set(sys.modules)
    package = types.ModuleType("nuscenes")
    package.__path__ = [root]
    utils = types.ModuleType("nuscenes.utils")
    utils.__path__ = [f"{root}/utils"]
    data_classes = types.ModuleType("nuscenes.utils.data_classes")
    data_classes.Box = object  # only used in type hints of functions the metric does not call
    for name, module in (
        ("nuscenes", package),
        ("nuscenes.utils", utils),
        ("nuscenes.utils.data_classes", data_classes),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    modules = types.SimpleNamespace(
        algo=importlib.import_module("nuscenes.eval.detection.algo"),
        data=importlib.import_module("nuscenes.eval.detection.data_classes"),
        common=importlib.import_module("nuscenes.eval.common.data_classes"),
        constants=importlib.import_module("nuscenes.eval.detection.constants"),
    )
    yield modules
    for name in set(sys.modules) - before:
        sys.modules.pop(name, None)


def random_scene(rng, classes, count):
    boxes = []
    for _ in range(count):
        w, l, h = rng.uniform(0.4, 3.0, size=3)  # noqa: E741
        boxes.append([*rng.uniform(-25, 25, size=2), rng.uniform(0, 2), w, l, h, rng.uniform(-np.pi, np.pi),
                      *rng.normal(0, 3, size=2)])  # fmt: skip
    return np.array(boxes).reshape(-1, 9), rng.integers(len(classes), size=count)


def comparison_scenes(classes: list[str]) -> list[dict]:
    """Six seeded samples: jittered copies of most ground-truth boxes plus false positives, with an exact
    duplicate (a tie in score order) and rounded scores (ties between different boxes too)."""
    rng = np.random.default_rng(0)
    scenes = []
    for s in range(6):
        boxes, labels = random_scene(rng, classes, 25)
        keep = rng.uniform(size=len(boxes)) < 0.8
        jitter = np.concatenate([rng.normal(0, 0.8, (len(boxes), 2)), rng.normal(0, 0.2, (len(boxes), 7))], 1)
        noisy = boxes + jitter
        noisy[:, 3:6] = np.abs(noisy[:, 3:6]) + 0.05
        extra, extra_labels = random_scene(rng, classes, 10)
        p_boxes = np.concatenate([noisy[keep], extra])
        p_labels = np.concatenate([labels[keep], extra_labels])
        if s == 0:
            p_boxes[1], p_labels[1] = p_boxes[0], p_labels[0]
        scores = rng.uniform(size=len(p_boxes)).round(2)
        gt_attrs = default_attributes(torch.from_numpy(labels), torch.from_numpy(boxes), classes).numpy()
        p_attrs = np.maximum(
            rng.choice([-1, 0, 1, 2, 4, 5, 6, 7], size=len(p_boxes)), 0
        )  # some right, some wrong
        scenes.append(
            {
                "token": f"sample{s}",
                "gt": (boxes, labels, gt_attrs),
                "pred": (p_boxes, p_labels, p_attrs, scores),
            }
        )
    return scenes  # fmt: skip


def zoo_metrics(classes: list[str]) -> dict[str, float]:
    metric = NuScenesDetectionMetric(classes, class_ranges={c: 1e9 for c in classes})
    for scene in comparison_scenes(classes):
        (boxes, labels, attrs), (p_boxes, p_labels, p_attrs, scores) = scene["gt"], scene["pred"]
        metric.update(
            [{"boxes": torch.from_numpy(p_boxes), "labels": torch.from_numpy(p_labels),
              "scores": torch.from_numpy(scores), "attributes": torch.from_numpy(p_attrs)}],
            [{"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels), "attributes": torch.from_numpy(attrs)}],
        )  # fmt: skip
    return {k: float(v) for k, v in metric.compute().items()}


def devkit_metrics(devkit, classes: list[str]) -> dict[str, float]:
    """The devkit's own accumulate / calc_ap / calc_tp on the comparison scenes, named as the zoo names them."""
    from zoo.bev.metrics import ATTRIBUTE_NAMES as attributes  # indices are ours; the devkit sees the names

    assert set(attributes) == set(devkit.constants.ATTRIBUTE_NAMES)
    gt_boxes, pred_boxes = devkit.common.EvalBoxes(), devkit.common.EvalBoxes()

    def to_devkit(token, boxes, labels, attrs, scores=None):
        return [devkit.data.DetectionBox(
            sample_token=token, translation=tuple(b[:3]), size=tuple(b[3:6]),
            rotation=(math.cos(b[6] / 2), 0.0, 0.0, math.sin(b[6] / 2)), velocity=tuple(b[7:9]),
            ego_translation=tuple(b[:3]), detection_name=classes[labels[n]],
            detection_score=-1.0 if scores is None else float(scores[n]),
            attribute_name="" if attrs[n] < 0 else attributes[attrs[n]],
        ) for n, b in enumerate(boxes)]  # fmt: skip

    for scene in comparison_scenes(classes):
        gt_boxes.add_boxes(scene["token"], to_devkit(scene["token"], *scene["gt"]))
        pred_boxes.add_boxes(scene["token"], to_devkit(scene["token"], *scene["pred"]))
    config = devkit.data.DetectionConfig(
        class_range={c: 1e9 for c in classes}, dist_fcn="center_distance", dist_ths=[0.5, 1.0, 2.0, 4.0],
        dist_th_tp=2.0, min_recall=0.1, min_precision=0.1, max_boxes_per_sample=500, mean_ap_weight=5,
    )  # fmt: skip
    metrics = devkit.data.DetectionMetrics(config)
    from nuscenes.eval.common.utils import center_distance

    for name in classes:
        for th in config.dist_ths:
            md = devkit.algo.accumulate(gt_boxes, pred_boxes, name, center_distance, th)
            metrics.add_label_ap(name, th, devkit.algo.calc_ap(md, 0.1, 0.1))
        md = devkit.algo.accumulate(gt_boxes, pred_boxes, name, center_distance, 2.0)
        for key in ("trans_err", "vel_err", "scale_err", "orient_err", "attr_err"):
            excluded = (name == "traffic_cone" and key in ("attr_err", "vel_err", "orient_err")) or (
                name == "barrier" and key in ("attr_err", "vel_err")
            )
            metrics.add_label_tp(name, key, np.nan if excluded else devkit.algo.calc_tp(md, 0.1, key))
    values = {"mAP": metrics.mean_ap, "NDS": metrics.nd_score}
    values.update({f"AP_{name}": metrics.mean_dist_aps[name] for name in classes})
    values.update({short: metrics.tp_errors[key] for key, short in TP_NAMES.items()})
    return {k: float(v) for k, v in values.items()}


TP_NAMES = {
    "trans_err": "mATE",
    "scale_err": "mASE",
    "orient_err": "mAOE",
    "vel_err": "mAVE",
    "attr_err": "mAAE",
}
#: The devkit's values on the comparison scenes (nuscenes-devkit 1.2.0), pinned so that CI compares against them
#: without the devkit, whose numpy<2 pin the zoo's environment cannot satisfy. Regenerate with
#: ``pip install --no-deps --target /tmp/nusc nuscenes-devkit pyquaternion`` and
#: ``PYTHONPATH=/tmp/nusc python -m tests.bev.test_metrics``.
DEVKIT_REFERENCE = Path(__file__).with_name("devkit_reference.json")


def test_agrees_with_the_pinned_nuscenes_devkit_values():
    reference = json.loads(DEVKIT_REFERENCE.read_text())
    ours = zoo_metrics(reference["classes"])
    assert 0.05 < reference["metrics"]["mAP"] < 0.95  # a non-trivial case
    for name, value in reference["metrics"].items():
        assert ours[name] == pytest.approx(value, abs=1e-5), name


def test_agrees_with_the_installed_nuscenes_devkit(devkit):
    classes = list(devkit.constants.DETECTION_NAMES)
    live, ours = devkit_metrics(devkit, classes), zoo_metrics(classes)
    for name, value in live.items():
        assert ours[name] == pytest.approx(value, abs=1e-5), name
    assert json.loads(DEVKIT_REFERENCE.read_text()) == {"classes": classes, "metrics": live}


if __name__ == "__main__":  # regenerate the pinned reference with the devkit on the path
    import contextlib

    with contextlib.ExitStack() as stack:
        patch = stack.enter_context(pytest.MonkeyPatch.context())
        modules = next(devkit.__wrapped__(patch))
        names = list(modules.constants.DETECTION_NAMES)
        payload = {"classes": names, "metrics": devkit_metrics(modules, names)}
    DEVKIT_REFERENCE.write_text(json.dumps(payload, indent=1) + "\n")
    print(
        f"wrote {DEVKIT_REFERENCE}: mAP {payload['metrics']['mAP']:.4f}, NDS {payload['metrics']['NDS']:.4f}"
    )
