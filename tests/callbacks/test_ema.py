"""``zoo.callbacks.EMA``: the bugs EMA implementations usually ship, one test each."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, ModelCheckpoint
from timm.utils.model_ema import ModelEmaV3

from tests.callbacks.callback_testing import TinyClassifier, tiny_loader
from zoo.callbacks import EMA, ema_decay


def timm_reference(snapshots, steps, decay, warmup, update_after_step=0, **kwargs):
    """timm's ModelEmaV3 fed the live weights after the given optimizer steps (1-based)."""
    model = TinyClassifier()
    reference = ModelEmaV3(
        model, decay=decay, use_warmup=warmup, update_after_step=update_after_step, **kwargs
    )
    for step in steps:
        model.load_state_dict(snapshots[step - 1])
        reference.update(model, step=step)
    return reference.module.state_dict()


def ema_state(callback: EMA) -> dict[str, torch.Tensor]:
    return dict(zip(callback.names, callback.ema))


def assert_states_equal(ours, reference, exact=True):
    assert ours.keys() == reference.keys()
    for name, value in reference.items():
        if exact:
            assert torch.equal(ours[name], value), name
        else:
            torch.testing.assert_close(ours[name].float(), value.float(), rtol=0, atol=1e-6, msg=name)


def test_decay_schedule_matches_timm():
    reference = ModelEmaV3(torch.nn.Linear(2, 2), decay=0.999, use_warmup=True, warmup_power=0.75)
    for step in range(1, 200, 7):
        assert ema_decay(step - 1, 0.999, warmup=True, warmup_power=0.75) == reference.get_decay(step)
    assert ema_decay(0, 0.9) == 0.0  # the first update copies
    assert ema_decay(5, 0.9) == 0.9


def test_updates_once_per_optimizer_step_under_accumulation(make_trainer):
    """8 micro-batches with accumulate_grad_batches=2 are 4 optimizer steps: 4 updates, equal to timm's EMA."""
    L.seed_everything(0)
    model, ema = TinyClassifier(), EMA(decay=0.99, warmup=True)
    trainer = make_trainer(max_epochs=1, accumulate_grad_batches=2, callbacks=[ema], limit_val_batches=0)
    trainer.fit(model, tiny_loader(n=64, batch_size=8))
    assert trainer.global_step == 4 and len(model.snapshots) == 4
    assert ema.num_updates == 4
    assert_states_equal(ema_state(ema), timm_reference(model.snapshots, [1, 2, 3, 4], 0.99, True))


def test_every_n_steps_delayed_start_and_warmup_match_timm(make_trainer):
    L.seed_everything(0)
    model, ema = TinyClassifier(), EMA(decay=0.99, warmup=True, start_step=3, update_every_n_steps=2)
    trainer = make_trainer(max_steps=10, callbacks=[ema], limit_val_batches=0)
    trainer.fit(model, tiny_loader())
    assert ema.num_updates == 4 and ema.last_update_step == 10  # after steps 4, 6, 8, 10
    # timm counts decay from update_after_step; our first update (step 4) is its copy step.
    expected = timm_reference(model.snapshots, [4, 6, 8, 10], 0.99, True, update_after_step=3)
    assert_states_equal(ema_state(ema), expected)


def test_uses_fused_foreach_update(make_trainer, monkeypatch):
    calls = []
    original = torch._foreach_lerp_
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda *a, **k: calls.append(len(a[0])) or original(*a, **k))
    L.seed_everything(0)
    ema = EMA(decay=0.9)
    make_trainer(max_steps=3, callbacks=[ema], limit_val_batches=0).fit(TinyClassifier(), tiny_loader())
    n_float = sum(t.is_floating_point() for t in ema.ema)
    assert calls == [n_float, n_float]  # one call per update after the first (a copy), over every tensor


def test_validation_before_start_uses_live_weights_after_start_uses_ema(make_trainer):
    """Lightning's EMAWeightAveraging validates on the never-updated copy before a delayed start (#21724)."""
    L.seed_everything(0)
    model, ema = TinyClassifier(), EMA(decay=0.9, start_step=5)
    trainer = make_trainer(max_steps=8, val_check_interval=2, callbacks=[ema], limit_val_batches=1)
    trainer.fit(model, tiny_loader(), tiny_loader(n=16))
    seen = dict(model.seen_in_validation)
    assert sorted(seen) == [2, 4, 6, 8]
    for step in (2, 4):
        assert_states_equal(seen[step], model.snapshots[step - 1])
    assert_states_equal(seen[6], model.snapshots[5])  # the EMA started after step 6, as a copy
    expected = timm_reference(model.snapshots, [6, 7, 8], 0.9, False, update_after_step=5)
    assert_states_equal(seen[8], expected)
    assert not torch.equal(seen[8]["net.0.weight"], model.snapshots[7]["net.0.weight"])
    # ...and the live weights came back after each validation: training equals a run without EMA.
    L.seed_everything(0)
    plain = TinyClassifier()
    make_trainer(max_steps=8, val_check_interval=2, limit_val_batches=1).fit(
        plain, tiny_loader(), tiny_loader(16)
    )
    assert_states_equal(model.state_copy(), plain.state_copy())


class SaveDuringValidation(Callback):
    def __init__(self, path):
        self.path = path

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        trainer.save_checkpoint(self.path)


def test_checkpoint_never_holds_swapped_weights(make_trainer, tmp_path):
    L.seed_everything(0)
    model, ema = TinyClassifier(), EMA(decay=0.9)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/loss", save_last=True)
    during = SaveDuringValidation(tmp_path / "during.ckpt")
    trainer = make_trainer(
        max_steps=4, limit_val_batches=1, enable_checkpointing=True, callbacks=[ema, checkpoint, during]
    )
    trainer.fit(model, tiny_loader(n=32), tiny_loader(n=16))
    live = model.snapshots[-1]
    for path in (tmp_path / "during.ckpt", checkpoint.last_model_path, checkpoint.best_model_path):
        saved = torch.load(path, weights_only=True)
        assert_states_equal(saved["state_dict"], live)
        assert_states_equal(EMA.ema_state_dict(saved), ema_state(ema))
    assert not torch.equal(live["net.0.weight"], ema_state(ema)["net.0.weight"])


def test_resume_is_bit_exact(make_trainer, tmp_path):
    def run(max_epochs, ckpt_path=None):
        L.seed_everything(0)
        model = TinyClassifier()
        ema = EMA(decay=0.95, warmup=True, start_step=2, update_every_n_steps=3)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
        trainer = make_trainer(
            max_epochs=max_epochs, limit_val_batches=0, enable_checkpointing=True, callbacks=[ema, checkpoint]
        )
        trainer.fit(model, tiny_loader(n=40), ckpt_path=ckpt_path)  # 5 steps per epoch
        return model, ema, checkpoint

    straight_model, straight, _ = run(4)
    _, _, checkpoint = run(2)
    resumed_model, resumed, _ = run(4, ckpt_path=checkpoint.last_model_path)
    assert resumed.num_updates == straight.num_updates == 6  # after steps 3, 6, ..., 18
    assert resumed.last_update_step == straight.last_update_step == 18
    assert_states_equal(ema_state(resumed), ema_state(straight))
    assert_states_equal(resumed_model.state_copy(), straight_model.state_copy())


def test_export_carries_ema_weights(make_trainer, tmp_path):
    L.seed_everything(0)
    model, ema = TinyClassifier(), EMA(decay=0.9)
    trainer = make_trainer(max_steps=4, limit_val_batches=0, callbacks=[ema])
    trainer.fit(model, tiny_loader())
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    EMA.export(tmp_path / "run.ckpt", tmp_path / "ema.ckpt")
    exported = torch.load(tmp_path / "ema.ckpt", weights_only=True)
    assert "optimizer_states" not in exported and "callbacks" not in exported
    restored = TinyClassifier()
    restored.load_state_dict(exported["state_dict"])
    assert_states_equal(restored.state_copy(), ema_state(ema))
    with pytest.raises(ValueError, match="overwrite"):
        EMA.export(tmp_path / "run.ckpt", tmp_path / "run.ckpt")


def test_copy_to_model_on_train_end(make_trainer):
    L.seed_everything(0)
    model, ema = TinyClassifier(), EMA(decay=0.9, copy_to_model_on_train_end=True)
    make_trainer(max_steps=4, limit_val_batches=0, callbacks=[ema]).fit(model, tiny_loader())
    assert_states_equal(model.state_copy(), ema_state(ema))


def test_equals_lightning_ema_weight_averaging(make_trainer):
    """Same decay, no warmup: our averaged weights equal Lightning's (which copies at its first update too)."""
    runs = {}
    for name, callback in (("ours", EMA(decay=0.9)), ("lightning", EMAWeightAveraging(decay=0.9))):
        L.seed_everything(0)
        model = TinyClassifier()
        make_trainer(max_steps=6, limit_val_batches=0, callbacks=[callback]).fit(model, tiny_loader())
        runs[name] = (model, callback)
    ours = ema_state(runs["ours"][1])
    average = runs["lightning"][1]._average_model.module  # Lightning copied it into the model at train end
    theirs = {k: v for k, v in average.state_dict().items() if v.is_floating_point()}
    assert_states_equal({k: ours[k] for k in theirs}, theirs, exact=False)
    assert_states_equal(runs["ours"][0].snapshots[-1], runs["lightning"][0].snapshots[-1])


@pytest.mark.parametrize(
    "kwargs",
    [{"decay": 1.0}, {"update_every_n_steps": 0}, {"start_step": -1}, {"min_decay": 0.5, "decay": 0.4}],
)
def test_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="EMA"):
        EMA(**kwargs)


def test_test_stage_from_checkpoint_uses_ema(make_trainer, tmp_path):
    L.seed_everything(0)
    model, ema = TinyClassifier(), EMA(decay=0.9)
    trainer = make_trainer(max_steps=4, limit_val_batches=0, callbacks=[ema])
    trainer.fit(model, tiny_loader())
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    fresh = TinyClassifier()
    evaluator = make_trainer(callbacks=[EMA(decay=0.9)], limit_val_batches=1)
    evaluator.validate(fresh, tiny_loader(n=16), ckpt_path=tmp_path / "run.ckpt")
    assert_states_equal(fresh.seen_in_validation[0][1], ema_state(ema))
    assert_states_equal(fresh.state_copy(), copy.deepcopy(model.snapshots[-1]))


def test_cpu_copy_equals_the_default(make_trainer):
    runs = []
    for cpu in (False, True):
        L.seed_everything(0)
        ema = EMA(decay=0.9, warmup=True, cpu=cpu)
        make_trainer(max_steps=4, limit_val_batches=0, callbacks=[ema]).fit(TinyClassifier(), tiny_loader())
        assert all(t.device.type == "cpu" for t in ema.ema)
        runs.append(ema_state(ema))
    assert_states_equal(runs[1], runs[0])


def test_image_classifier_validates_on_ema_weights(make_trainer):
    """End to end on a zoo model (timm DeiT, dict batches, torchmetrics): val/acc comes from the EMA weights."""
    from zoo.datamodules import ImageClassificationDataModule
    from zoo.vision import ImageClassifier

    L.seed_everything(0)
    model = ImageClassifier(
        model_name="deit_tiny_patch16_224",
        model_kwargs={"depth": 1, "embed_dim": 48, "num_heads": 2},
        patch_size=8,
    )
    data = ImageClassificationDataModule(train_size=64, val_size=32, test_size=32, batch_size=32)
    ema = EMA(decay=0.5)
    seen = []
    model.register_forward_pre_hook(
        lambda m, args: seen.append(m.model.head.weight.detach().clone()) if not m.training else None
    )
    trainer = make_trainer(max_epochs=2, callbacks=[ema])
    trainer.fit(model, data)
    head = ema.names.index("model.head.weight")
    assert torch.equal(seen[-1], ema.ema[head]) and not torch.equal(model.model.head.weight, ema.ema[head])
    assert "val/acc" in trainer.callback_metrics
