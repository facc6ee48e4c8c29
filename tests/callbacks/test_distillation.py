"""``zoo.callbacks.Distillation`` / ``SelfDistillation``: loss semantics, teacher handling, the interface."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from timm.utils.model_ema import ModelEmaV3

from tests.callbacks.callback_testing import TinyClassifier, tiny_loader
from zoo.callbacks import Distillation, SelfDistillation, distillation_loss, load_teacher
from zoo.datamodules import ImageClassificationDataModule
from zoo.vision import ImageClassifier


def test_soft_loss_is_hinton_kl_times_t_squared():
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    loss, parts = distillation_loss(student, labels, teacher, "soft", alpha=0.3, temperature=4.0)
    p_t = F.softmax(teacher / 4, dim=-1)
    kl = (p_t * (p_t.log() - F.log_softmax(student / 4, dim=-1))).sum(-1).mean() * 16
    torch.testing.assert_close(parts["distill_loss"], kl)
    torch.testing.assert_close(loss, 0.7 * F.cross_entropy(student, labels) + 0.3 * kl)
    assert distillation_loss(teacher, labels, teacher, "soft")[1]["distill_loss"].abs() < 1e-6


def test_hard_and_deit_losses_use_teacher_argmax():
    torch.manual_seed(0)
    cls, dist, teacher, labels = (
        torch.randn(4, 3),
        torch.randn(4, 3),
        torch.randn(4, 3),
        torch.randint(0, 3, (4,)),
    )
    loss, _ = distillation_loss(cls, labels, teacher, "hard", alpha=1.0)
    torch.testing.assert_close(loss, F.cross_entropy(cls, teacher.argmax(-1)))
    loss, parts = distillation_loss((cls, dist), labels, teacher, "deit", alpha=0.5)
    torch.testing.assert_close(parts["task_loss"], F.cross_entropy(cls, labels))
    torch.testing.assert_close(parts["distill_loss"], F.cross_entropy(dist, teacher.argmax(-1)))
    with pytest.raises(ValueError, match="distillation token"):
        distillation_loss(cls, labels, teacher, "deit")


def test_teacher_frozen_in_eval_and_out_of_the_checkpoint(make_trainer, tmp_path):
    L.seed_everything(0)
    teacher = TinyClassifier()
    torch.save({"state_dict": teacher.state_dict()}, tmp_path / "teacher.ckpt")
    before = teacher.state_copy()
    student = TinyClassifier()
    callback = Distillation(
        teacher="tests.callbacks.callback_testing.TinyClassifier",
        teacher_init_args={},
        teacher_checkpoint=str(tmp_path / "teacher.ckpt"),
        mode="soft",
        temperature=2.0,
    )
    trainer = make_trainer(max_steps=4, limit_val_batches=0, callbacks=[callback])
    trainer.fit(student, tiny_loader())
    loaded = callback.teacher
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert all(torch.equal(v, before[k]) for k, v in loaded.state_dict().items())  # BN stats frozen too
    assert len(student.snapshots) == 4  # the student trained through the replaced training_step
    assert "training_step" not in student.__dict__  # restored after fit
    trainer.save_checkpoint(tmp_path / "student.ckpt")
    saved = torch.load(tmp_path / "student.ckpt", weights_only=True)
    assert saved["state_dict"].keys() == student.state_dict().keys()
    n_optimized = sum(len(g["params"]) for g in saved["optimizer_states"][0]["param_groups"])
    assert n_optimized == len(list(student.parameters()))


def tiny_vit(model_name="deit_tiny_patch16_224", **kwargs) -> ImageClassifier:
    return ImageClassifier(
        model_name=model_name,
        model_kwargs={"depth": 1, "embed_dim": 48, "num_heads": 2},
        patch_size=8,
        **kwargs,
    )


def test_deit_mode_teacher_sees_the_mixed_batch_under_precision_context(make_trainer):
    """DeiT's recipe: the teacher runs on the student's mixup'd images, in the trainer's autocast."""
    L.seed_everything(0)
    student = tiny_vit("deit_tiny_distilled_patch16_224", mixup_alpha=0.8, lr_scheduler=None)
    teacher = tiny_vit(lr_scheduler=None)
    seen = {}

    def record(key, value):
        seen.setdefault(key, value)  # the first training batch only; returns None so outputs stay

    student.model.patch_embed.register_forward_pre_hook(lambda m, args: record("student", args[0].clone()))
    teacher.model.patch_embed.register_forward_pre_hook(lambda m, args: record("teacher", args[0].clone()))
    teacher.register_forward_hook(lambda m, args, out: record("dtype", out.dtype))
    callback = Distillation(teacher=teacher, mode="deit", alpha=0.5)
    data = ImageClassificationDataModule(train_size=64, val_size=32, test_size=32, batch_size=32)
    trainer = make_trainer(max_steps=2, limit_val_batches=0, precision="bf16-mixed", callbacks=[callback])
    trainer.fit(student, data)
    torch.testing.assert_close(seen["teacher"], seen["student"])
    assert seen["dtype"] == torch.bfloat16
    assert trainer.callback_metrics["train/distill_loss"] > 0


def test_teacher_from_a_cli_checkpoint_alone(tmp_path):
    """The zoo CLI stores the class path in the checkpoint's hyper-parameters: that suffices."""
    L.seed_everything(0)
    teacher = tiny_vit()
    hparams = {**teacher.hparams, "_class_path": "zoo.vision.ImageClassifier"}
    torch.save({"state_dict": teacher.state_dict(), "hyper_parameters": hparams}, tmp_path / "t.ckpt")
    loaded = load_teacher(checkpoint=tmp_path / "t.ckpt").eval()
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(images), teacher.eval()(images))
    torch.save({"state_dict": teacher.state_dict()}, tmp_path / "anonymous.ckpt")
    with pytest.raises(ValueError, match="class path"):
        load_teacher(checkpoint=tmp_path / "anonymous.ckpt")
    with pytest.raises(FileNotFoundError, match=r"missing\.ckpt"):
        load_teacher("zoo.vision.ImageClassifier", checkpoint=tmp_path / "missing.ckpt")


def test_student_without_the_interface_is_named(make_trainer):
    class NoInterface(TinyClassifier):
        distillation_targets = None

    trainer = make_trainer(
        max_steps=1, limit_val_batches=0, callbacks=[Distillation(teacher=TinyClassifier())]
    )
    with pytest.raises(TypeError, match="NoInterface has no distillation_targets"):
        trainer.fit(NoInterface(), tiny_loader())


def test_self_distillation_teacher_is_the_ema_of_the_student(make_trainer, tmp_path):
    L.seed_everything(0)
    student, callback = TinyClassifier(), SelfDistillation(decay=0.9, weight=0.1)
    trainer = make_trainer(max_steps=5, limit_val_batches=0, callbacks=[callback])
    trainer.fit(student, tiny_loader())
    model = TinyClassifier()
    reference = ModelEmaV3(model, decay=0.9)
    for step, snapshot in enumerate(student.snapshots, start=1):
        model.load_state_dict(snapshot)
        reference.update(model, step=step)
    for name, value in reference.module.state_dict().items():
        assert torch.equal(callback.teacher.state_dict()[name], value), name
    trainer.save_checkpoint(tmp_path / "s.ckpt")
    saved = torch.load(tmp_path / "s.ckpt", weights_only=True)
    assert saved["state_dict"].keys() == student.state_dict().keys()
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("SelfDistillation")]
    assert state["num_updates"] == 5


def test_self_distillation_resumes_with_the_same_teacher(make_trainer, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(max_epochs, ckpt_path=None):
        L.seed_everything(0)
        student, callback = TinyClassifier(), SelfDistillation(decay=0.8, weight=0.5, warmup=True)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
        trainer = make_trainer(
            max_epochs=max_epochs,
            limit_val_batches=0,
            enable_checkpointing=True,
            callbacks=[callback, checkpoint],
        )
        trainer.fit(student, tiny_loader(n=32), ckpt_path=ckpt_path)
        return student, callback, checkpoint

    straight_student, straight, _ = run(4)
    _, _, checkpoint = run(2)
    resumed_student, resumed, _ = run(4, checkpoint.last_model_path)
    for name, value in straight.teacher.state_dict().items():
        assert torch.equal(resumed.teacher.state_dict()[name], value), name
    for name, value in straight_student.state_dict().items():
        assert torch.equal(resumed_student.state_dict()[name], value), name


# ------------------------------------------------------------------ feature distillation
def feature_run(make_trainer, tmp_path, max_epochs, ckpt_path=None, name="features"):
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(1)
    teacher = TinyClassifier()
    L.seed_everything(0)
    student = TinyClassifier()
    # Student Linear(8 -> 16) onto the teacher's logits layer Linear(16 -> 4): a 16 -> 4 projector.
    callback = Distillation(teacher=teacher, feature_layers={"net.0": "net.3"}, feature_weight=0.5)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / name, save_last=True)
    trainer = make_trainer(
        max_epochs=max_epochs,
        limit_val_batches=0,
        enable_checkpointing=True,
        callbacks=[callback, checkpoint],
    )
    trainer.fit(student, tiny_loader(n=32), ckpt_path=ckpt_path)
    return trainer, student, callback, checkpoint


def test_feature_projectors_reach_the_optimizer_and_stay_out_of_the_student(make_trainer, tmp_path):
    trainer, student, callback, checkpoint = feature_run(make_trainer, tmp_path, max_epochs=1)
    (projector,) = callback.projectors.values()
    assert (projector.linear.in_features, projector.linear.out_features) == (16, 4)
    optimizer = trainer.optimizers[0]
    assert len(optimizer.param_groups) == 2
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == {id(p) for p in projector.parameters()}
    assert all(id(p) in {id(q) for q in optimizer.state} for p in projector.parameters())  # stepped
    assert trainer.callback_metrics["train/feature_loss"] > 0
    assert not callback._hooks and "training_step" not in student.__dict__  # cleaned up after fit
    saved = torch.load(checkpoint.last_model_path, weights_only=True)
    assert saved["state_dict"].keys() == student.state_dict().keys()  # loadable without the callback
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("Distillation")]
    for key, value in projector.state_dict().items():
        assert torch.equal(state["projectors"][f"net__0.{key}"], value)


def test_feature_distillation_resumes_exactly(make_trainer, tmp_path):
    _, straight_student, straight, _ = feature_run(make_trainer, tmp_path, max_epochs=4, name="straight")
    _, _, _, checkpoint = feature_run(make_trainer, tmp_path, max_epochs=2, name="half")
    trainer, resumed_student, resumed, _ = feature_run(
        make_trainer, tmp_path, 4, checkpoint.last_model_path, name="resumed"
    )
    assert trainer.global_step == 16
    for name, value in straight.projectors.state_dict().items():
        assert torch.equal(resumed.projectors.state_dict()[name], value), name
    for name, value in straight_student.state_dict().items():
        assert torch.equal(resumed_student.state_dict()[name], value), name


def test_feature_distillation_on_deit_follows_the_schedule(make_trainer):
    """A distillation-token student against a plain teacher: patch tokens are compared, lr is scheduled."""
    L.seed_everything(0)
    student = tiny_vit("deit_tiny_distilled_patch16_224")
    teacher = ImageClassifier(
        model_name="deit_tiny_patch16_224",
        model_kwargs={"depth": 2, "embed_dim": 64, "num_heads": 2},
        patch_size=8,
    )
    callback = Distillation(teacher=teacher, mode="deit", feature_layers={"model.blocks.0": "model.blocks.1"})
    data = ImageClassificationDataModule(train_size=64, val_size=32, test_size=32, batch_size=16)
    trainer = make_trainer(max_steps=3, limit_val_batches=0, callbacks=[callback])
    trainer.fit(student, data)
    (projector,) = callback.projectors.values()
    assert (projector.linear.in_features, projector.linear.out_features) == (48, 64)
    groups = trainer.optimizers[0].param_groups
    assert groups[-1]["lr"] == groups[0]["lr"] != trainer.lr_scheduler_configs[0].scheduler.base_lrs[0]
    assert trainer.callback_metrics["train/feature_loss"] > 0


def test_feature_layer_names_are_checked(make_trainer):
    callback = Distillation(teacher=TinyClassifier(), feature_layers={"net.9": "net.0"})
    trainer = make_trainer(max_steps=1, limit_val_batches=0, callbacks=[callback])
    with pytest.raises(ValueError, match=r"student layer 'net\.9'"):
        trainer.fit(TinyClassifier(), tiny_loader())
    with pytest.raises(ValueError, match="feature_weight"):
        Distillation(teacher=TinyClassifier(), feature_weight=-1.0)
