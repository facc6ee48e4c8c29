"""BEVFormerPlanner under the module contract: joint or frozen-perception training, the planning metrics next to
the detection ones, a plan in each predict record, its config."""

from __future__ import annotations

import pytest
import torch

from zoo.bev import BEVFormerDetector, BEVFormerPlanner, EgoStatusPlanner
from zoo.bev.planning_metrics import collisions
from zoo.bev.planning_module import PLANNER_INPUTS, scale_gradient
from zoo.bev.safety_brake import predicted_footprints
from zoo.bev.trajectory import constant_velocity_plan
from zoo.cli import ZooCLI
from zoo.datamodules import BEVDetectionDataModule
from zoo.datamodules.bev import collate_bev

from ..conftest import CONFIGS, TINY_BEV_ARGS

SMALL_MODEL = {"num_query": 20, "bev_h": 12, "bev_w": 12, "encoder_layers": 1, "decoder_layers": 2}


def small_data(**kwargs) -> BEVDetectionDataModule:
    options = {"batch_size": 2, "img_size": (32, 56), "queue_length": 2, "train_scenes": 1, "val_scenes": 1,
               "test_scenes": 1, "frames_per_scene": 2, "num_objects": 8, "planning": True, **kwargs}  # fmt: skip
    return BEVDetectionDataModule(**options)


def small_planner(data: BEVDetectionDataModule, **kwargs) -> BEVFormerPlanner:
    return BEVFormerPlanner(model_kwargs=SMALL_MODEL, class_names=data.class_names,
                            point_cloud_range=data.point_cloud_range, **kwargs)  # fmt: skip


def batch_of(data: BEVDetectionDataModule) -> dict:
    data.setup("fit")
    return collate_bev([data.train_set[0], data.train_set[1]])


def test_forward_plans_from_the_example_inputs(single_thread):
    model = BEVFormerPlanner(model_kwargs=SMALL_MODEL).eval()
    inputs = model.example_inputs(batch_size=3)
    logits, codes, waypoints = model(*inputs)
    assert logits[-1].shape == (3, 20, 5) and codes[-1].shape == (3, 20, 10) and waypoints.shape == (3, 6, 2)
    # untrained, the head's residual is zero: the plan is the ego's constant velocity
    assert torch.allclose(waypoints, constant_velocity_plan(inputs[4][:, 8], inputs[4][:, 9]))


def test_joint_training_updates_perception_and_planner(single_thread):
    data = small_data()
    model = small_planner(data, loss_weights={"plan_collision": 1.0})
    losses, *_ = model._losses(batch_of(data))
    assert set(losses) >= {"loss", "loss_det", "loss_plan_l1", "loss_plan_col", "loss_cls", "loss_bbox"}
    expected = losses["loss_det"] + losses["loss_plan_l1"] + losses["loss_plan_col"]
    assert torch.allclose(losses["loss"], expected)
    losses["loss"].backward()
    assert model.planner.ego.trajectory[-1].weight.grad.abs().sum() > 0
    assert model.model.bev_embedding.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown keys"):
        small_planner(data, loss_weights={"plan": 1.0})


def test_planning_gradient_sets_how_much_of_the_planning_loss_reaches_perception(single_thread):
    data = small_data()
    batch = batch_of(data)
    grads = {}
    for share in (1.0, 0.25, 0.0):
        torch.manual_seed(0)
        model = small_planner(data, planning_gradient=share)
        torch.nn.init.normal_(
            model.planner.ego.trajectory[-1].weight, std=0.01
        )  # zeros pass no gradient back
        *_, waypoints = model(*(batch[key] for key in PLANNER_INPUTS))
        waypoints.square().sum().backward()  # a planning loss alone
        assert model.planner.ego.trajectory[-1].weight.grad.abs().sum() > 0
        grads[share] = model.model.bev_embedding.weight.grad
    assert grads[1.0].abs().sum() > 0 and grads[0.0] is None
    torch.testing.assert_close(grads[0.25], 0.25 * grads[1.0])
    assert scale_gradient(torch.ones(2), 0.5).tolist() == [1.0, 1.0]  # the forward pass is unchanged


def test_frozen_perception_loads_a_detector_and_trains_only_the_planner(
    tmp_path, make_trainer, single_thread
):
    data = small_data()
    detector = BEVFormerDetector(model_kwargs=SMALL_MODEL, class_names=data.class_names,
                                 point_cloud_range=data.point_cloud_range)  # fmt: skip
    trainer = make_trainer(max_steps=1)
    trainer.fit(detector, data)
    trainer.save_checkpoint(tmp_path / "detector.ckpt")
    model = small_planner(data, perception=str(tmp_path / "detector.ckpt"))
    for key, value in detector.model.state_dict().items():
        assert torch.equal(model.model.state_dict()[key], value), key
    assert not any(p.requires_grad for p in model.model.parameters())
    losses, *_ = model._losses(batch_of(data))
    assert torch.allclose(losses["loss"], losses["loss_plan_l1"] + 0.5 * losses["loss_plan_col"])
    losses["loss"].backward()
    assert model.planner.ego.trajectory[-1].weight.grad is not None
    assert not model.train().model.training and model.planner.training
    make_trainer(max_steps=2).fit(model, data)  # buffers too (BatchNorm statistics) stay the detector's
    for key, value in detector.model.state_dict().items():
        assert torch.equal(model.model.state_dict()[key], value), key
    with pytest.raises(FileNotFoundError, match="perception checkpoint"):
        small_planner(data, perception=str(tmp_path / "missing.ckpt"))


def test_validation_logs_detection_and_planning_metrics(make_trainer, single_thread):
    data = small_data()
    trainer = make_trainer(limit_val_batches=1)
    results = trainer.validate(small_planner(data), data, verbose=False)[0]
    assert {"val/mAP", "val/NDS", "val/plan_L2_3s", "val/plan_col_3s", "val/plan_L2_avg_3s",
            "val/plan_reactive_L2_3s", "val/plan_reactive_col_3s"} <= set(results)  # fmt: skip
    assert set(trainer.progress_bar_metrics) == {"val/mAP", "val/plan_L2_3s"}


def test_predict_records_carry_the_plan(make_trainer, single_thread):
    data = small_data()
    records = make_trainer().predict(small_planner(data), data)[0]
    assert len(records[0]["plan"]) == 6 and len(records[0]["plan"][0]) == 2
    assert {"id", "boxes", "top_down"} <= set(records[0])
    detection_only = small_data(planning=False)
    detection_only.setup("fit")
    with pytest.raises(ValueError, match="planning=true"):
        small_planner(data).predict(collate_bev([detection_only.train_set[0]]))


def test_the_safety_brake_retimes_the_network_plan_to_clear_the_detections(single_thread):
    data = small_data()
    batch = batch_of(data)
    with torch.no_grad():
        network = small_planner(data, safety_brake=False).eval().predict(batch)
        ignoring = small_planner(data, brake_score_threshold=1.01).eval().predict(batch)
        obeying = small_planner(data, brake_score_threshold=0.0).eval().predict(batch)
    for plain, unchanged, braked in zip(network, ignoring, obeying):
        assert torch.equal(plain["plan"], unchanged["plan"])
        agents, masks = predicted_footprints([braked], score_threshold=0.0, margin=2.0)  # the default margin
        # every waypoint clears the detections, or holds where the ego stood (hit while stopped: no braking helps)
        held = torch.cat([torch.zeros(1, 2), braked["plan"][:-1]]).sub(braked["plan"]).abs().amax(-1) < 1e-6
        assert not (collisions(braked["plan"][None], [agents[0]], [masks[0]])[0] & ~held).any()
        progress = torch.linalg.vector_norm(braked["plan"], dim=-1)
        assert torch.all(progress <= torch.linalg.vector_norm(plain["plan"], dim=-1) + 1e-5)


def test_ego_status_planner_trains_on_the_same_batches(make_trainer, single_thread):
    data = small_data(train_scenes=2, frames_per_scene=4)
    model = EgoStatusPlanner(hidden=32)
    trainer = make_trainer(max_steps=4, limit_val_batches=1)
    trainer.fit(model, data)
    results = trainer.validate(model, data, verbose=False)[0]
    assert {"val/plan_L2_3s", "val/plan_reactive_col_3s"} <= set(results)
    records = trainer.predict(model, data)[0]
    assert len(records[0]["plan"]) == 6


def test_planning_config_runs(tmp_path, single_thread):
    cli = ZooCLI(args=["fit", "--config", str(CONFIGS / "bev" / "bevformer_planning.yaml"), *TINY_BEV_ARGS,
                       "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}",
                       "--trainer.enable_progress_bar=false"])  # fmt: skip
    assert isinstance(cli.model, BEVFormerPlanner) and cli.datamodule.hparams.planning
    assert cli.model.loss_weights == {"detection": 1.0, "plan_l1": 1.0, "plan_collision": 0.5}
    assert cli.trainer.global_step == 1
