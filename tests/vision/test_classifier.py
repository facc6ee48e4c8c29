"""ImageClassifier: timm equivalence, DeiT head averaging, layer decay, mixup, predict records, bad input."""

from __future__ import annotations

import lightning as L
import pytest
import timm
import torch
from PIL import Image

from zoo.datamodules import ImageClassificationDataModule
from zoo.optim import WarmupCosineLR
from zoo.vision import ImageClassifier

TIMM_VARIANTS = [
    ("vit_tiny_patch16_224", {"patch_size": 8}),
    ("deit_tiny_patch16_224", {"patch_size": 8}),
    ("deit_tiny_distilled_patch16_224", {"patch_size": 8}),
    ("swin_tiny_patch4_window7_224", {"patch_size": 2, "window_size": 4, "depths": (2, 2, 2, 2)}),
]


@pytest.mark.parametrize(("name", "kwargs"), TIMM_VARIANTS, ids=[v[0] for v in TIMM_VARIANTS])
def test_outputs_equal_timm_for_the_same_weights(name, kwargs):
    torch.manual_seed(0)
    patch = {"patch_size": kwargs.pop("patch_size")}
    ours = ImageClassifier(model_name=name, num_classes=7, img_size=32, model_kwargs=kwargs, **patch).eval()
    reference = timm.create_model(name, num_classes=7, img_size=32, **kwargs, **patch).eval()
    reference.load_state_dict(ours.model.state_dict())
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours(images), reference(images))
        assert torch.equal(ours.forward_features(images), reference.forward_features(images))


def test_distilled_deit_evaluates_with_the_mean_of_both_heads(tiny_deit_kwargs):
    model = ImageClassifier(**{**tiny_deit_kwargs, "model_name": "deit_tiny_distilled_patch16_224"}).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        cls_logits, dist_logits = model.forward_heads(images)
        assert not torch.allclose(cls_logits, dist_logits)
        torch.testing.assert_close(model(images), (cls_logits + dist_logits) / 2)
    assert model.is_distilled


def test_forward_heads_rejects_models_without_a_distillation_token(tiny_deit_kwargs):
    with pytest.raises(TypeError, match="distillation token"):
        ImageClassifier(**tiny_deit_kwargs).forward_heads(torch.randn(1, 3, 32, 32))


def test_layer_decay_survives_a_plain_torch_scheduler(tiny_deit_kwargs):
    model = ImageClassifier(
        **tiny_deit_kwargs,
        layer_decay=0.5,
        optimizer=lambda groups: torch.optim.AdamW(groups, lr=1.0, weight_decay=0.1),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
    )
    optimizer = model.optimizer_factory(model.parameter_groups())
    from zoo.optim import apply_lr_scales

    apply_lr_scales(optimizer)
    scheduler = model.scheduler_factory(optimizer)
    before = sorted({round(g["lr"], 6) for g in optimizer.param_groups})
    # 2 blocks + stem + head groups: 0.5**3, 0.5**2, 0.5, 1
    assert before == [0.125, 0.25, 0.5, 1.0]
    optimizer.step()
    scheduler.step()
    assert sorted({round(g["lr"], 6) for g in optimizer.param_groups}) == [b / 2 for b in before]
    decays = {g.get("weight_decay", "optimizer default") for g in optimizer.param_groups}
    assert decays == {0.0, 0.1}, "no-decay groups keep 0, others take the optimizer's value from YAML"


def test_weight_decay_groups_skip_norms_biases_and_tokens(tiny_deit_kwargs):
    model = ImageClassifier(**tiny_deit_kwargs)
    decayed, no_decay = model.parameter_groups()
    assert "weight_decay" not in decayed and no_decay["weight_decay"] == 0.0
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert id(model.model.cls_token) in no_decay_ids and id(model.model.pos_embed) in no_decay_ids
    assert all(p.ndim > 1 for p in decayed["params"])


def test_warmup_cosine_fills_the_run_length_from_the_trainer(tiny_deit_kwargs, tiny_image_data):
    model = ImageClassifier(**tiny_deit_kwargs)
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model, tiny_image_data)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert isinstance(scheduler, WarmupCosineLR)
    assert scheduler.total_steps == trainer.global_step == 8
    assert scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-9)


def test_mixup_trains_and_odd_batches_fall_back_to_hard_labels(tiny_deit_kwargs):
    model = ImageClassifier(**tiny_deit_kwargs, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    for batch_size in (4, 3):
        batch = {"image": torch.randn(batch_size, 3, 32, 32), "label": torch.randint(0, 12, (batch_size,))}
        loss = model.training_step(batch, 0)
        loss.backward()
        assert torch.isfinite(loss)


def test_a_class_count_that_disagrees_with_the_data_fails_at_setup(tiny_deit_kwargs, tiny_image_data):
    model = ImageClassifier(**tiny_deit_kwargs, num_classes=5)
    trainer = L.Trainer(fast_dev_run=True, logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="num_classes=5 but the data module has 12 classes"):
        trainer.fit(model, tiny_image_data)


def test_unknown_stem_is_rejected(tiny_deit_kwargs):
    with pytest.raises(ValueError, match="stem must be"):
        ImageClassifier(**tiny_deit_kwargs, stem="hexagonal")


def test_conv_stem_keeps_the_token_grid():
    model = ImageClassifier(
        model_name="deit_tiny_patch16_224", patch_size=8, stem="conv", model_kwargs={"depth": 1}
    )
    tokens = model.forward_features(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, 1 + 16, 192)


def test_example_inputs_run_through_the_module(tiny_deit_kwargs):
    model = ImageClassifier(**{**tiny_deit_kwargs, "patch_size": 4}, img_size=16, in_chans=1).eval()
    (images,) = model.example_inputs(batch_size=3)
    assert images.shape == (3, 1, 16, 16)
    assert model(*model.example_inputs()).shape == (2, 12)


def test_class_names_must_match_the_class_count(tiny_deit_kwargs):
    with pytest.raises(ValueError, match="class_names has 2 names for num_classes=12"):
        ImageClassifier(**tiny_deit_kwargs, class_names=["cat", "dog"])


def _predict(model, data) -> list[dict]:
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    return [record for batch in trainer.predict(model, data) for record in batch]


def test_predict_records_name_the_user_images_and_their_classes(tmp_path, tiny_deit_kwargs):
    for i, colour in enumerate(((255, 0, 0), (0, 0, 255), (0, 255, 0))):
        Image.new("RGB", (40, 30), colour).save(tmp_path / f"{i}.jpg")
    data = ImageClassificationDataModule(predict_path=str(tmp_path), batch_size=2)
    model = ImageClassifier(**tiny_deit_kwargs, class_names=data.class_names)
    records = _predict(model, data)
    assert [r["id"] for r in records] == ["0.jpg", "1.jpg", "2.jpg"]
    for record in records:
        assert set(record) == {"id", "label", "class_index", "top_k"}
        assert record["label"] == data.class_names[record["class_index"]] == record["top_k"][0]["class"]
        probabilities = [entry["probability"] for entry in record["top_k"]]
        assert len(probabilities) == 5 and probabilities == sorted(probabilities, reverse=True)
        assert all(isinstance(p, float) for p in probabilities) and sum(probabilities) <= 1.0 + 1e-6


def test_without_class_names_records_use_indices_and_keep_all_classes_below_five(tiny_deit_kwargs):
    data = ImageClassificationDataModule(train_size=8, val_size=8, test_size=3, batch_size=2)
    model = ImageClassifier(**tiny_deit_kwargs, num_classes=3)
    model.setup = lambda stage: None  # the shapes have 12 classes: only the record format is under test
    records = _predict(model, data)
    assert [r["id"] for r in records] == ["0", "1", "2"]
    assert all(r["label"] == str(r["class_index"]) and len(r["top_k"]) == 3 for r in records)
    assert sum(e["probability"] for e in records[0]["top_k"]) == pytest.approx(1.0)


def test_a_checkpoint_written_before_class_names_loads(tmp_path, tiny_deit_kwargs):
    model = ImageClassifier(**tiny_deit_kwargs, class_names=[f"c{i}" for i in range(12)])
    trainer = L.Trainer(max_steps=0, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.strategy.connect(model)
    path = tmp_path / "old.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["hyper_parameters"]["class_names"]
    torch.save(checkpoint, path)
    restored = ImageClassifier.load_from_checkpoint(path).eval()
    assert restored.hparams.class_names is None
    record = restored.predict_step({"image": torch.randn(1, 3, 32, 32)}, 0)[0]
    assert record["id"] == "0:0" and record["label"] == str(record["class_index"])
