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
    assert tiny_image_data.num_classes == 12 and tiny_image_data.img_size == 32


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
    data = ImageClassificationDataModule(data_dir=str(tmp_path), img_size=16, batch_size=2, num_classes=2)
    data.setup("fit")
    assert data.class_names == ["cat", "dog"] and len(data.train_set) == 8 and len(data.val_set) == 4
    batch = next(iter(data.val_dataloader()))
    assert batch["image"].shape == (2, 3, 16, 16) and batch["caption"] == ["cat", "cat"]


def test_unsplit_image_folder_holds_out_a_fixed_validation_share(tmp_path):
    _write_images(tmp_path / "a", 10)
    _write_images(tmp_path / "b", 10)
    splits = []
    for _ in range(2):
        data = ImageClassificationDataModule(data_dir=str(tmp_path), img_size=16, val_fraction=0.2)
        data.setup("fit")
        splits.append(sorted(data.val_set.indices))
    assert len(splits[0]) == 4 and splits[0] == splits[1]


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageClassificationDataModule(data_dir=str(tmp_path / "missing"))


def test_empty_class_folder_is_named(tmp_path):
    _write_images(tmp_path / "full", 2)
    (tmp_path / "empty").mkdir()
    data = ImageClassificationDataModule(data_dir=str(tmp_path), img_size=16)
    with pytest.raises(ValueError, match=r"class folder .*empty' contains no images"):
        data.setup("fit")


def test_unreadable_image_is_named(tmp_path):
    _write_images(tmp_path / "a", 2)
    _write_images(tmp_path / "b", 2)
    (tmp_path / "b" / "broken.png").write_bytes(b"not a png")
    data = ImageClassificationDataModule(data_dir=str(tmp_path), img_size=16)
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
    data = ImageClassificationDataModule(data_dir=str(tmp_path), img_size=16)
    with pytest.raises(ValueError, match=r"classes in .*val' are \['a', 'c'\], but the training split has"):
        data.setup("fit")


def test_model_links_name_the_image_side_and_the_class_names():
    assert ImageClassificationDataModule.model_links == {
        "num_classes": "num_classes",
        "img_size": "img_size",
        "class_names": "class_names",
    }
    assert ImageClassificationDataModule().class_names[:2] == ["red circle", "green circle"]


def test_predict_path_folder_is_searched_recursively(tmp_path):
    _write_images(tmp_path / "photos" / "holiday", 2)
    _write_images(tmp_path / "photos", 1, size=40)
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    data = ImageClassificationDataModule(predict_path=str(tmp_path / "photos"), img_size=16, batch_size=8)
    data.setup("predict")
    batch = next(iter(data.predict_dataloader()))
    assert batch["id"] == ["0.png", "holiday/0.png", "holiday/1.png"]
    assert batch["image"].shape == (3, 3, 16, 16) and "label" not in batch


def test_predict_path_single_image_and_image_list(tmp_path):
    _write_images(tmp_path / "a", 2)
    data = ImageClassificationDataModule(predict_path=str(tmp_path / "a" / "1.png"), img_size=16)
    data.setup("predict")
    assert [item["id"] for item in data.predict_set] == ["1.png"]

    listing = tmp_path / "images.txt"
    listing.write_text(f"# two images\na/1.png\n\n{tmp_path / 'a' / '0.png'}\n")
    data = ImageClassificationDataModule(predict_path=str(listing), img_size=16, batch_size=4)
    data.setup("predict")
    batch = next(iter(data.predict_dataloader()))
    assert batch["id"] == ["a/1.png", str(tmp_path / "a" / "0.png")]
    assert batch["image"].shape == (2, 3, 16, 16)


def test_predict_path_problems_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"predict_path .*nowhere' does not exist"):
        ImageClassificationDataModule(predict_path=str(tmp_path / "nowhere"))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"predict_path .*empty' holds no images"):
        ImageClassificationDataModule(predict_path=str(tmp_path / "empty"))
    listing = tmp_path / "list.txt"
    listing.write_text("missing.png\n")
    with pytest.raises(FileNotFoundError, match=r"list\.txt', line 1: image 'missing\.png' does not exist"):
        ImageClassificationDataModule(predict_path=str(listing))
    (tmp_path / "weights.bin").write_bytes(bytes([0xFF, 0xFE, 0x00, 0x81]))
    with pytest.raises(ValueError, match=r"weights\.bin' is neither an image"):
        ImageClassificationDataModule(predict_path=str(tmp_path / "weights.bin"))


def test_unreadable_predict_image_is_named_at_setup(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    data = ImageClassificationDataModule(predict_path=str(tmp_path))
    with pytest.raises(ValueError, match=r"unreadable image .*broken\.png"):
        data.setup("predict")


def test_without_predict_path_the_test_split_is_predicted_with_ids(tmp_path, tiny_image_data):
    tiny_image_data.setup("predict")
    batch = next(iter(tiny_image_data.predict_dataloader()))
    assert batch["id"] == [str(i) for i in range(16)] and batch["label"].shape == (16,)

    for split in ("train", "val"):
        _write_images(tmp_path / split / "cat", 2)
        _write_images(tmp_path / split / "dog", 2)
    folders = ImageClassificationDataModule(data_dir=str(tmp_path), img_size=16, batch_size=8)
    folders.setup("predict")
    ids = next(iter(folders.predict_dataloader()))["id"]
    assert ids == ["cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png"]
