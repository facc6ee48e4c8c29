"""BEVFormerDetector under the zoo's module contract: tensors in ``forward``, the nuScenes metrics through the
base, one submission record per sample, and checkpoints written before the argument renames."""

from __future__ import annotations

import math

import lightning
import numpy as np
import pytest
import torch

from zoo.bev import BEVFormerDetector, box_to_submission
from zoo.bev.metrics import ATTRIBUTE_NAMES
from zoo.datamodules import BEVDetectionDataModule
from zoo.datamodules.bev import collate_bev
from zoo.predict import RecordPredictionWriter, load_records

SMALL_MODEL = {"num_query": 20, "bev_h": 12, "bev_w": 12, "encoder_layers": 1, "decoder_layers": 2}
SUBMISSION_FIELDS = {
    "sample_token", "translation", "size", "rotation", "velocity", "detection_name", "detection_score",
    "attribute_name",
}  # fmt: skip


def small_data() -> BEVDetectionDataModule:
    return BEVDetectionDataModule(batch_size=2, img_size=(32, 56), queue_length=2, train_scenes=1,
                                  val_scenes=1, test_scenes=1, frames_per_scene=2, num_objects=8)  # fmt: skip


def small_model(data: BEVDetectionDataModule, **kwargs) -> BEVFormerDetector:
    return BEVFormerDetector(model_kwargs=SMALL_MODEL, class_names=data.class_names,
                             point_cloud_range=data.point_cloud_range, **kwargs)  # fmt: skip


@pytest.mark.parametrize("temporal", [True, False])
def test_example_inputs_run_forward(temporal, single_thread):
    model = BEVFormerDetector(model_kwargs=SMALL_MODEL, temporal=temporal).eval()
    images, lidar2img, can_bus, prev_exists = model.example_inputs(batch_size=3)
    assert images.shape == (3, 2, 6, 3, 64, 112) and lidar2img.shape == (3, 2, 6, 4, 4)
    assert can_bus.shape == (3, 2, 18) and prev_exists.tolist() == [[False, True]] * 3
    logits, codes = model(images, lidar2img, can_bus, prev_exists)
    assert len(logits) == len(codes) == SMALL_MODEL["decoder_layers"]
    assert logits[-1].shape == (3, 20, 5) and codes[-1].shape == (3, 20, 10)


def test_metrics_are_the_base_group_and_never_checkpointed(make_trainer, single_thread):
    data = small_data()
    model = small_model(data)
    keys = set(model.state_dict())
    trainer = make_trainer(limit_val_batches=1)
    results = trainer.validate(model, data, verbose=False)[0]
    expected = {"val/loss", "val/mAP", "val/NDS", "val/mATE", "val/mASE", "val/mAOE", "val/mAVE", "val/mAAE"}
    assert expected | {f"val/AP_{name}" for name in data.class_names} == set(results)
    assert set(trainer.progress_bar_metrics) == {"val/mAP", "val/NDS"}
    assert set(model.state_dict()) == keys and all(key.startswith("model.") for key in keys)


def test_predict_writes_one_submission_record_per_sample(make_trainer, tmp_path, single_thread):
    data = small_data()
    model = small_model(data, max_detections=30).eval()
    trainer = make_trainer(callbacks=[RecordPredictionWriter(str(tmp_path / "predictions"))])
    trainer.predict(model, data, return_predictions=False)
    records = load_records(tmp_path / "predictions")
    assert [r["id"] for r in records] == ["test_scene000_frame00", "test_scene000_frame01"]
    first = records[0]
    assert (tmp_path / "predictions" / first["top_down"]).is_file()
    assert len(first["boxes"]) == 30
    for box in first["boxes"]:
        assert set(box) == SUBMISSION_FIELDS and box["sample_token"] == first["id"]
        assert len(box["translation"]) == len(box["size"]) == 3 and len(box["velocity"]) == 2
        assert math.isclose(np.linalg.norm(box["rotation"]), 1.0, abs_tol=1e-6)
        assert box["detection_name"] in data.class_names and 0.0 <= box["detection_score"] <= 1.0
        assert box["attribute_name"] in ("", *ATTRIBUTE_NAMES)
    # the boxes are the head's, moved into the scene's global frame by the sample's pose
    sample = data.test_set[0]
    expected = model.predict(collate_bev([sample]))[0]
    pose = sample["lidar2global"].numpy()
    assert first["boxes"][0]["translation"] == pytest.approx(
        box_to_submission(expected["boxes"][0].tolist(), pose)["translation"], abs=1e-4
    )
    assert [b["detection_score"] for b in first["boxes"]] == pytest.approx(expected["scores"].tolist())


def test_old_checkpoints_load_after_upgrade(tmp_path):
    data = small_data()
    model = small_model(data)
    hparams = {
        "variant": "bevformer_cpu", "config": SMALL_MODEL, "class_names": data.class_names,
        "point_cloud_range": data.point_cloud_range, "temporal": True, "backbone_lr_scale": 1.0,
        "max_detections": 100, "score_threshold": 0.0, "class_ranges": None,
        "_class_path": "zoo.bev.BEVFormerDetector",
        "_instantiator": "lightning.pytorch.cli.instantiate_module",
    }  # fmt: skip
    old = {
        "state_dict": model.state_dict(),
        "hyper_parameters": hparams,
        "datamodule_hyper_parameters": {**dict(data.hparams), "image_size": (32, 56)},
        "pytorch-lightning_version": lightning.__version__,
    }
    old["datamodule_hyper_parameters"].pop("img_size")
    new = BEVFormerDetector.upgrade_checkpoint(old)
    assert "variant" in old["hyper_parameters"]  # the input is left as it was
    assert (
        new["hyper_parameters"]["model_name"] == "bevformer_cpu" and "config" not in new["hyper_parameters"]
    )
    assert BEVFormerDetector.upgrade_checkpoint(new) == new
    torch.save(new, tmp_path / "upgraded.ckpt")
    torch.save(old, tmp_path / "old.ckpt")
    for name in ("upgraded.ckpt", "old.ckpt"):  # the old one loads directly too
        reloaded = BEVFormerDetector.load_from_checkpoint(tmp_path / name)
        assert reloaded.hparams.model_kwargs == SMALL_MODEL
    assert reloaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in reloaded.state_dict().items())
    assert BEVDetectionDataModule.load_from_checkpoint(tmp_path / "upgraded.ckpt").img_size == (32, 56)
    with pytest.raises(ValueError, match="both old and new names"):
        BEVFormerDetector.upgrade_checkpoint(
            {"hyper_parameters": {"variant": "bevformer_cpu", "model_name": "bevformer_cpu"}}
        )
