"""Captioned image data (embedded shapes, folders, JSONL) and `zoo predict` writing one record per prompt."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from zoo.cli import ZooCLI
from zoo.datamodules.captioned_images import CaptionedImageDataModule, tokenize_words
from zoo.diffusion import LatentDiffusion, SamplingConfig
from zoo.diffusion.images import make_grid, to_pil, to_unit_range

from ..conftest import CONFIGS
from .conftest import tiny_captions


def test_shapes_batches_are_captioned_in_minus_one_to_one_and_the_vocabulary_covers_them():
    data = CaptionedImageDataModule(train_size=32, val_size=8, test_size=8, batch_size=16)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (16, 3, 32, 32) and batch["label"].shape == (16,)
    assert -1 <= batch["image"].min() < 0 < batch["image"].max() <= 1
    vocabulary = set(data.caption_vocabulary)
    assert all(set(tokenize_words(c)) <= vocabulary for c in batch["caption"])
    assert data.num_classes == 12
    noisy = CaptionedImageDataModule(train_size=4, noise=0.04)
    noisy.setup()
    assert not torch.equal(noisy.train_set[0]["image"], data.train_set[0]["image"])


def _images(folder, n=4):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (40, 30), (i * 40, 100, 200)).save(folder / f"img{i}.png")


def test_folder_with_txt_captions(tmp_path):
    _images(tmp_path)
    for i in range(4):
        (tmp_path / f"img{i}.txt").write_text(f"A blue picture number {i}\n")
    data = CaptionedImageDataModule(data_dir=str(tmp_path), img_size=16, val_fraction=0.25, batch_size=2)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (2, 3, 16, 16) and batch["label"].tolist() == [-1, -1]
    assert {"a", "blue", "picture", "number", "0"} <= set(data.caption_vocabulary)
    (tmp_path / "img3.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"img3\.png.*no caption file"):
        CaptionedImageDataModule(data_dir=str(tmp_path))


def test_jsonl_captions_with_labels_and_errors_naming_the_line(tmp_path):
    _images(tmp_path)
    records = [
        {"file": f"img{i}.png", "caption": f"picture {i}", "label": "odd" if i % 2 else "even"}
        for i in range(4)
    ]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    data = CaptionedImageDataModule(data_dir=str(tmp_path), captions_file=str(tmp_path / "captions.jsonl"))
    assert data.class_names == ["even", "odd"] and data.num_classes == 2
    (tmp_path / "bad.jsonl").write_text(json.dumps(records[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        CaptionedImageDataModule(data_dir=str(tmp_path), captions_file=str(tmp_path / "bad.jsonl"))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"file": "img0.png"}))
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: expected a string 'caption'"):
        CaptionedImageDataModule(data_dir=str(tmp_path), captions_file=str(tmp_path / "bad.jsonl"))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"file": "missing.png", "caption": "x"}))
    with pytest.raises(FileNotFoundError, match=r"bad\.jsonl:1: image .*missing\.png"):
        CaptionedImageDataModule(data_dir=str(tmp_path), captions_file=str(tmp_path / "bad.jsonl"))


def test_predict_path_lines_are_class_names_indices_or_captions(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red circle\n# a comment\n\n5\na large blue cross in the centre\n")
    items = CaptionedImageDataModule(predict_path=str(prompts)).prompts()
    assert [i["label"] for i in items] == [0, 5, -1]
    assert items[1]["name"] == "blue square" and items[2]["caption"] == "a large blue cross in the centre"
    prompts.write_text("99\n")
    with pytest.raises(ValueError, match=r"prompts\.txt:1: class index 99"):
        CaptionedImageDataModule(predict_path=str(prompts)).prompts()
    with pytest.raises(FileNotFoundError, match="not a file of prompts"):
        CaptionedImageDataModule(predict_path=str(tmp_path / "missing.txt")).prompts()


@pytest.mark.parametrize("captions", [False, True], ids=["class", "caption"])
def test_predict_records_redraw_from_their_seed(tiny_ldm_kwargs, captions):
    options = {"conditioning": tiny_captions()} if captions else {}
    model = LatentDiffusion(
        **{**tiny_ldm_kwargs, **options, "sampling": SamplingConfig(steps=2, samples_per_prompt=2, seed=7)}
    ).eval()
    data = CaptionedImageDataModule(batch_size=2)
    batch = next(iter(data.predict_dataloader()))
    records = model.predict_step(batch, 0)
    assert [r["id"] for r in records] == ["red circle", "green circle"]
    assert [r["seed"] for r in records] == [7, 8]
    asked = (
        {"captions": [batch["caption"][1]] * 2} if captions else {"labels": [batch["label"][1].item()] * 2}
    )
    assert records[1]["prompt"] == (batch["caption"][1] if captions else "green circle")
    redrawn = model.generate(**asked, seed=records[1]["seed"])
    assert records[1]["grid"].tobytes() == to_pil(make_grid(to_unit_range(redrawn), nrow=2)).tobytes()


def test_zoo_predict_writes_a_record_and_a_grid_per_prompt(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red circle\ngreen cross\n")
    ZooCLI(
        args=[
            "predict", "--config", str(CONFIGS / "diffusion" / "ldm_unet_class.yaml"),
            "--model.init_args.scale_factor=1.0", "--model.init_args.sampling.samples_per_prompt=3",
            "--model.init_args.sampling.steps=2", f"--data.init_args.predict_path={prompts}",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false", "--trainer.logger=false",
        ]
    )  # fmt: skip
    (jsonl,) = tmp_path.rglob("predictions.jsonl")
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [(r["id"], r["prompt"], r["seed"]) for r in records] == [
        ("red circle", "red circle", 0),
        ("green cross", "green cross", 1),
    ]
    with Image.open(jsonl.parent / records[1]["grid"]) as grid:
        assert grid.size == (3 * 34 + 2, 34 + 2)  # the prompt's 3 samples in a row, 2 px padding
