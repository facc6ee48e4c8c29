"""Resolution buckets: mixed-shape folders train in batches of one shape, framed without squashing."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from zoo.datamodules.buckets import BucketBatchSampler, nearest_bucket, resolution_buckets
from zoo.datamodules.captioned_images import CaptionedImageDataModule
from zoo.diffusion import LatentDiffusion

from .conftest import TINY_DIT, tiny_captions


def test_buckets_keep_the_area_and_the_step():
    buckets = resolution_buckets(64, 16, max_aspect_ratio=2.0)
    assert (64, 64) in buckets
    assert all(h % 16 == 0 and w % 16 == 0 and h * w <= 64 * 64 for h, w in buckets)
    assert all(0.5 <= w / h <= 2.0 for h, w in buckets)
    assert [w / h for h, w in buckets] == sorted(w / h for h, w in buckets)
    assert buckets[nearest_bucket(100, 300, buckets)] == max(buckets, key=lambda hw: hw[1] / hw[0])
    assert buckets[nearest_bucket(300, 290, buckets)] == (64, 64)
    with pytest.raises(ValueError, match="multiple of step"):
        resolution_buckets(60, 16)


def _split_colour_image(path, width: int, height: int) -> None:
    """Left half red, right half blue: a squashed or shifted crop would move the boundary."""
    image = Image.new("RGB", (width, height), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, width // 2, height))
    image.save(path)


@pytest.fixture
def mixed_folder(tmp_path):
    shapes = {"wide": (64, 32), "tall": (32, 64), "square": (48, 48)}
    for kind, (width, height) in shapes.items():
        for i in range(5):
            _split_colour_image(tmp_path / f"{kind}{i}.png", width, height)
            (tmp_path / f"{kind}{i}.txt").write_text(f"a {kind} picture")
    return tmp_path


def _bucketed(folder, **kwargs) -> CaptionedImageDataModule:
    data = CaptionedImageDataModule(
        data_dir=str(folder), img_size=32, bucket_step=8, resolution_buckets=True, batch_size=2, **kwargs
    )
    data.setup()
    return data


def test_every_batch_has_one_shape_that_follows_the_images_aspect(mixed_folder):
    data = _bucketed(mixed_folder, val_fraction=0.2)
    served = []
    for batch in data.train_dataloader():
        height, width = batch["image"].shape[-2:]
        assert height % 8 == 0 and width % 8 == 0 and height * width <= 32 * 32
        for caption in batch["caption"]:
            kind = caption.split()[1]
            assert {"wide": width > height, "tall": height > width, "square": height == width}[kind]
        served += batch["index"].tolist()
    assert sorted(served) == sorted(data.train_set.indices)  # each training image once per epoch

    image = data.train_set[0]["image"]
    width = image.shape[-1]
    assert (image[0, :, : width // 2 - 1] > 0.9).all() and (image[2, :, width // 2 + 1 :] > 0.9).all()


def test_buckets_need_a_folder():
    with pytest.raises(ValueError, match="needs data_dir"):
        CaptionedImageDataModule(resolution_buckets=True)


def test_distributed_ranks_split_the_batches_and_epochs_reshuffle():
    bucket_of = [0] * 7 + [1] * 6 + [2] * 3

    def plan(rank: int, epoch: int) -> list[list[int]]:
        ranks = DistributedSampler(range(16), num_replicas=2, rank=rank, shuffle=False)
        ranks.set_epoch(epoch)
        sampler = BucketBatchSampler(ranks, bucket_of, batch_size=3, shuffle=True, seed=0)
        assert len(sampler) == len(list(sampler))
        return list(sampler)

    first, second = plan(0, 0), plan(1, 0)
    assert len(first) == len(second)
    assert sorted(i for b in first + second for i in b)[:16] == list(range(16))  # all items, padding aside
    assert all(len({bucket_of[i] for i in batch}) == 1 for batch in first + second)
    assert plan(0, 1) != first


def test_latent_diffusion_trains_on_bucketed_batches(mixed_folder, tiny_ldm_kwargs):
    data = _bucketed(mixed_folder, val_fraction=0.2)
    model = LatentDiffusion(**{**tiny_ldm_kwargs, "img_size": 32, "conditioning": tiny_captions()})
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    shapes = []
    model.on_train_batch_start = lambda batch, _: shapes.append(tuple(batch["image"].shape[-2:]))
    trainer.fit(model, data)
    assert trainer.global_step == 4 and len(set(shapes)) > 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_dit_refuses_bucketed_data_with_the_reason(mixed_folder, tiny_ldm_kwargs):
    data = _bucketed(mixed_folder, val_fraction=0.2)
    kwargs = {**tiny_ldm_kwargs, "img_size": 32, "num_classes": 1, "model_name": "dit"}
    model = LatentDiffusion(**{**kwargs, "model_kwargs": dict(TINY_DIT)})
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match="cannot unpatchify"):
        trainer.fit(model, data)
