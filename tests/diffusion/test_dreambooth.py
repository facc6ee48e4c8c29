"""DreamBooth: the instance data, the identifier's class id, the cached class images and the two-part loss."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from zoo.datamodules.instance_images import InstanceImageDataModule, instance_images
from zoo.diffusion import DreamBooth, LatentDiffusion, PriorPreservation
from zoo.diffusion.embeddings import ExtendedEmbedding
from zoo.diffusion.evaluation import load_latent_diffusion
from zoo.diffusion.prior_images import class_images
from zoo.errors import ZooError
from zoo.lora import LoRAConfig

from .conftest import TINY_DIT, tiny_captions


@pytest.fixture
def base_checkpoint(tiny_ldm_kwargs, tmp_path) -> str:
    torch.manual_seed(0)
    base = LatentDiffusion(**tiny_ldm_kwargs)
    path = tmp_path / "base.ckpt"
    torch.save({"state_dict": base.state_dict()}, path)
    return str(path)


def _dreambooth(tiny_ldm_kwargs, base_checkpoint, **overrides) -> DreamBooth:
    arguments = {"class_labels": [0, 1, 2], "base_checkpoint": base_checkpoint, "prior": None}
    return DreamBooth(**{**tiny_ldm_kwargs, **arguments, **overrides})


def test_the_embedded_instance_is_a_yellow_circle_no_split_has():
    images = instance_images(5, "circle", "yellow", 16)
    assert images.shape == (5, 3, 16, 16)
    unit = (images + 1) / 2
    saturated = (unit.amax(1) - unit.amin(1)) > 0.35
    foreground = torch.stack([image[:, mask].mean(1) for image, mask in zip(unit, saturated)])
    assert (
        (foreground[:, 0] > 0.7).all() and (foreground[:, 1] > 0.6).all() and (foreground[:, 2] < 0.4).all()
    )
    data = InstanceImageDataModule(img_size=16, batch_size=4, repeats=10)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["label"].tolist() == [-1] * 4
    assert len(data.train_set) == 50 and len(data.val_set) == 5
    with pytest.raises(ZooError, match="colour 'purple'"):
        instance_images(2, "circle", "purple", 16)


def test_an_instance_folder_is_read_and_an_empty_one_is_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no pictures here")
    with pytest.raises(ZooError, match="contains no images"):
        InstanceImageDataModule(data_dir=str(empty))
    with pytest.raises(ZooError, match="does not exist"):
        InstanceImageDataModule(data_dir=str(tmp_path / "missing"))
    folder = tmp_path / "dog"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 30, 3), 60 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    data = InstanceImageDataModule(data_dir=str(folder), img_size=16)
    images = data.images()
    assert images.shape == (3, 3, 16, 16)
    torch.testing.assert_close(images[1], torch.full((3, 16, 16), 60 / 127.5 - 1), atol=1e-2, rtol=0)


def test_the_identifier_is_a_new_class_id_and_the_base_classes_are_unchanged(
    tiny_ldm_kwargs, base_checkpoint
):
    torch.manual_seed(0)
    base = LatentDiffusion(**{**tiny_ldm_kwargs, "base_checkpoint": base_checkpoint}).eval()
    model = _dreambooth(tiny_ldm_kwargs, base_checkpoint).eval()
    assert model.identifier_label == 13  # after 12 classes and the null class
    for table in (model.conditioner.embedding, model.model.class_embedding):
        assert isinstance(table, ExtendedEmbedding) and table.num_embeddings == 14
        torch.testing.assert_close(table.extra[0], table.weight[[0, 1, 2]].mean(0))
    latents, timesteps = torch.randn(3, 4, 4, 4), torch.tensor([10, 500, 900])
    for labels in ([0, 5, 11], [12, 12, 12]):  # the classes and the null class denoise as the base does
        expected = base.predict(latents, timesteps, base.conditioner(torch.tensor(labels)))
        torch.testing.assert_close(
            model.predict(latents, timesteps, model.conditioner(torch.tensor(labels))), expected
        )
    assert model.generate(labels=[13, 13]).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="class labels must be in"):
        model.conditioner(torch.tensor([14]))
    # instance data (label -1) is conditioned on the identifier
    cond = model.condition({"label": torch.tensor([-1, 4]), "image": torch.zeros(2, 3, 16, 16)})
    assert cond.class_labels.tolist() == [13, 4]


def test_bad_arguments_are_refused(tiny_ldm_kwargs, base_checkpoint):
    with pytest.raises(ValueError, match="needs class_labels"):
        _dreambooth(tiny_ldm_kwargs, base_checkpoint, class_labels=[])
    with pytest.raises(ValueError, match=r"class_labels \[12\] are not classes"):
        _dreambooth(tiny_ldm_kwargs, base_checkpoint, class_labels=[12])
    with pytest.raises(ValueError, match="needs ClassConditioning"):
        _dreambooth(tiny_ldm_kwargs, None, conditioning=tiny_captions())
    with pytest.raises(ValueError, match=r"prior\.num_images"):
        PriorPreservation(num_images=0)


def test_class_images_are_drawn_once_and_redrawn_when_the_model_or_prompt_changes(tiny_ldm_kwargs, tmp_path):
    model = LatentDiffusion(**tiny_ldm_kwargs).eval()
    calls = []
    generate = model.generate
    model.generate = lambda **kwargs: calls.append(kwargs["labels"]) or generate(**kwargs)
    images, labels, key = class_images(model, [0, 1], 5, tmp_path)
    assert images.dtype == torch.uint8 and images.shape == (5, 3, 16, 16)
    assert labels.tolist() == [0, 1, 0, 1, 0] and calls == [[0, 1, 0, 1, 0]]
    expected = ((generate(labels=[0, 1, 0, 1, 0], seed=0) + 1) * 127.5).round().to(torch.uint8)
    torch.testing.assert_close(images, expected)
    again, _, same_key = class_images(model, [0, 1], 5, tmp_path)
    assert same_key == key and len(calls) == 1  # read from the cache
    torch.testing.assert_close(again, images)
    assert class_images(model, [2], 5, tmp_path)[2] != key and len(calls) == 2  # another prompt
    with torch.no_grad():
        model.model.conv_in.weight.add_(0.01)
    assert class_images(model, [0, 1], 5, tmp_path)[2] != key and len(calls) == 3  # another model
    assert len(list(tmp_path.glob("class_images-*.safetensors"))) == 3
    assert not list(tmp_path.glob("*.tmp"))


def test_the_loss_is_instance_plus_weighted_prior_over_one_batch(tiny_ldm_kwargs, base_checkpoint):
    model = _dreambooth(tiny_ldm_kwargs, base_checkpoint, prior=PriorPreservation(num_images=6, weight=0.5))
    model._prior_images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    model._prior_labels = torch.tensor([0, 1, 2, 0, 1, 2])
    seen = []

    def per_sample_losses(batch, generator=None, dropout=0.0, training=False):
        seen.append((batch, dropout))
        return torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])

    model.per_sample_losses = per_sample_losses
    instance = {
        "image": torch.zeros(3, 3, 16, 16),
        "label": torch.tensor([-1, -1, -1]),
        "index": torch.arange(3),
    }
    loss = model.training_step(instance, 0)
    assert loss.item() == pytest.approx(2.0 + 0.5 * 20.0)
    ((batch, dropout),) = seen
    assert dropout == 0.0  # the null condition stays the base's
    assert batch["image"].shape[0] == 6 and batch["label"][:3].tolist() == [-1, -1, -1]
    assert set(batch["label"][3:].tolist()) <= {0, 1, 2}
    stored = model._prior_images.float().div(127.5).sub(1)
    for image in batch["image"][3:]:  # the class half is the cached class images
        assert any(torch.equal(image, s) for s in stored)


def test_with_lora_only_the_adapters_and_the_identifier_rows_train(tiny_ldm_kwargs, base_checkpoint):
    model = _dreambooth(tiny_ldm_kwargs, base_checkpoint, lora=LoRAConfig(rank=2))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or name.endswith(".extra") for name in trainable)
    assert {"conditioner.embedding.extra", "model.class_embedding.extra"} <= trainable


def test_fitting_draws_the_class_images_once_and_a_resumed_run_reuses_them(
    tiny_ldm_kwargs, base_checkpoint, tmp_path
):
    model = _dreambooth(tiny_ldm_kwargs, base_checkpoint, prior=PriorPreservation(num_images=4))
    base_rows = model.conditioner.embedding.weight.detach().clone()
    data = InstanceImageDataModule(img_size=16, batch_size=2, num_images=3, repeats=2)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(model, data)
    (cached,) = (tmp_path / "class_images").glob("class_images-*.safetensors")
    assert model._prior_images.shape == (4, 3, 16, 16)
    assert not torch.equal(model.conditioner.embedding.weight, base_rows)  # the full model trains
    trainer.save_checkpoint(tmp_path / "dreambooth.ckpt")
    reloaded = DreamBooth.load_from_checkpoint(tmp_path / "dreambooth.ckpt", map_location="cpu")
    torch.testing.assert_close(reloaded._prior_images, model._prior_images)
    assert reloaded._prior_key == model._prior_key and cached.name.endswith(".safetensors")
    torch.testing.assert_close(reloaded.conditioner.embedding.extra, model.conditioner.embedding.extra)
    assert type(load_latent_diffusion(str(tmp_path / "dreambooth.ckpt"))) is DreamBooth

    # resuming trains on the checkpoint's class images: nothing is drawn into an empty cache
    resumed = _dreambooth(tiny_ldm_kwargs, base_checkpoint, prior=PriorPreservation(num_images=4))
    again = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path / "resumed")  # fmt: skip
    again.fit(resumed, data, ckpt_path=tmp_path / "dreambooth.ckpt")
    assert again.global_step == 3 and not (tmp_path / "resumed" / "class_images").exists()
    torch.testing.assert_close(resumed._prior_images, model._prior_images)


def test_a_dit_gets_the_identifier_in_every_block_label_table(tiny_ldm_kwargs):
    model = DreamBooth(
        **{**tiny_ldm_kwargs, "model_name": "dit", "model_kwargs": dict(TINY_DIT)}, class_labels=[4]
    )
    extra = sorted(name for name, _ in model.named_parameters() if name.endswith(".extra"))
    assert extra == [
        "conditioner.embedding.extra",
        *(f"model.transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.extra" for i in range(2)),
    ]
    assert model.eval().generate(labels=[13]).shape == (1, 3, 16, 16)
