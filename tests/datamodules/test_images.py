"""Image data: the embedded shapes are deterministic and captioned; image folders fail clearly."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from zoo.datamodules import ImageClassificationDataModule, ShapesDataset
from zoo.datamodules.shapes import COLOURS, SHAPES


def test_shapes_are_a_pure_function_of_seed_split_and_index():
    a, b = ShapesDataset(8, seed=3), ShapesDataset(8, seed=3)
    assert all(torch.equal(a[i]["image"], b[i]["image"]) for i in range(8))
    assert torch.equal(ShapesDataset(8, seed=3)[5]["image"], ShapesDataset(6, seed=3)[5]["image"])
    assert not torch.equal(a[0]["image"], ShapesDataset(8, seed=4)[0]["image"])
    assert not torch.equal(a[0]["image"], ShapesDataset(8, seed=3, split="val")[0]["image"])


def test_captions_name_the_labelled_colour_and_shape():
    dataset = ShapesDataset(50)
    for i in range(50):
        item = dataset[i]
        colour, shape = dataset.class_names[item["label"]].split()
        assert f"{colour} {shape}" in item["caption"]
        assert item["image"].shape == (3, 32, 32) and 0 <= item["image"].min() <= item["image"].max() <= 1


def test_every_class_appears_and_classes_are_balanced():
    labels = torch.tensor([ShapesDataset(600)[i]["label"] for i in range(600)])
    counts = torch.bincount(labels, minlength=len(SHAPES) * len(COLOURS))
    assert counts.min() > 30


def test_datamodule_batches_and_metadata(tiny_image_data):
    tiny_image_data.setup("fit")
    batch = next(iter(tiny_image_data.train_dataloader()))
    assert batch["image"].shape == (16, 3, 32, 32) and batch["label"].shape == (16,)
    assert len(batch["caption"]) == 16
    assert tiny_image_data.num_classes == 12 and tiny_image_data.image_size == 32


def test_num_classes_that_disagrees_with_the_embedded_data():
    with pytest.raises(
        ValueError, match="num_classes=10 disagrees with the data: the embedded shapes set has 12"
    ):
        ImageClassificationDataModule(num_classes=10)


def _write_images(folder, count, size=12, colour=(255, 0, 0)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (size, size), colour).save(folder / f"{i}.png")


def test_image_folder_with_train_and_val_splits(tmp_path):
    for split, count in (("train", 4), ("val", 2)):
        _write_images(tmp_path / split / "cat", count)
        _write_images(tmp_path / split / "dog", count, colour=(0, 0, 255))
    data = ImageClassificationDataModule(data_dir=str(tmp_path), image_size=16, batch_size=2, num_classes=2)
    data.setup("fit")
    assert data.class_names == ["cat", "dog"] and len(data.train_set) == 8 and len(data.val_set) == 4
    batch = next(iter(data.val_dataloader()))
    assert batch["image"].shape == (2, 3, 16, 16) and batch["caption"] == ["cat", "cat"]


def test_unsplit_image_folder_holds_out_a_fixed_validation_share(tmp_path):
    _write_images(tmp_path / "a", 10)
    _write_images(tmp_path / "b", 10)
    splits = []
    for _ in range(2):
        data = ImageClassificationDataModule(data_dir=str(tmp_path), image_size=16, val_fraction=0.2)
        data.setup("fit")
        splits.append(sorted(data.val_set.indices))
    assert len(splits[0]) == 4 and splits[0] == splits[1]


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageClassificationDataModule(data_dir=str(tmp_path / "missing"))


def test_empty_class_folder_is_named(tmp_path):
    _write_images(tmp_path / "full", 2)
    (tmp_path / "empty").mkdir()
    data = ImageClassificationDataModule(data_dir=str(tmp_path), image_size=16)
    with pytest.raises(ValueError, match=r"class folder .*empty' contains no images"):
        data.setup("fit")


def test_unreadable_image_is_named(tmp_path):
    _write_images(tmp_path / "a", 2)
    _write_images(tmp_path / "b", 2)
    (tmp_path / "b" / "broken.png").write_bytes(b"not a png")
    data = ImageClassificationDataModule(data_dir=str(tmp_path), image_size=16)
    with pytest.raises(ValueError, match=r"unreadable image .*broken\.png"):
        data.setup("fit")


def test_class_count_disagreeing_with_a_folder(tmp_path):
    _write_images(tmp_path / "a", 2)
    _write_images(tmp_path / "b", 2)
    with pytest.raises(ValueError, match=r"num_classes=3 disagrees with the data: .* has 2 classes \(a, b\)"):
        ImageClassificationDataModule(data_dir=str(tmp_path), num_classes=3)


def test_val_classes_must_match_train_classes(tmp_path):
    _write_images(tmp_path / "train" / "a", 2)
    _write_images(tmp_path / "train" / "b", 2)
    _write_images(tmp_path / "val" / "a", 2)
    _write_images(tmp_path / "val" / "c", 2)
    data = ImageClassificationDataModule(data_dir=str(tmp_path), image_size=16)
    with pytest.raises(ValueError, match=r"classes in .*val' are \['a', 'c'\], but the training split has"):
        data.setup("fit")
