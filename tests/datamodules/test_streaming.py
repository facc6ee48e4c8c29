"""Streaming data (``zoo data optimize`` + LitData): an optimized directory gives the batches of its source.

Each source (an image tree, a FASTA file, a captioned folder) is written here, optimized once per module
and read by the same data module both ways: the batches (tensors and ids), token budgets, buckets,
augmentations, a resumed epoch and the DDP shards must not tell them apart.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.fabric.utilities.data import _replace_dunder_methods, _set_sampler_epoch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.connectors.data_connector import _get_distributed_sampler
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.data import _is_dataloader_shuffled, _update_dataloader
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader

from tests.conftest import tiny_trainer
from zoo import streaming
from zoo.datamodules import CaptionedImageDataModule, ImageClassificationDataModule, ProteinDataModule
from zoo.datamodules.epoch_plans import padded_to_multiple
from zoo.errors import MissingFileError, ZooError
from zoo.extras import MissingExtraError
from zoo.protein import ESM2MaskedLM

pytest.importorskip("litdata")


def zoo(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("ZOO_DEBUG", None)
    command = [sys.executable, "-m", "zoo", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=300, env=env)


# ------------------------------------------------------------------------------------------ sources
def _write_images(folder: Path, count: int, colour: tuple[int, int, int]) -> None:
    """Images of a few sizes with a gradient, so crops, flips and resizes change pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        size = (20 + 4 * (i % 3), 16 + 4 * (i % 2))
        pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
        pixels[...] = colour
        pixels[..., 1] = np.linspace(0, 255, size[0], dtype=np.uint8)[None, :]
        Image.fromarray(pixels).save(folder / f"{i}.png")


def _write_fasta(path: Path) -> None:
    """40 proteins of 5 to 90 residues, one mostly ``X`` (left out by the data module) and one bad."""
    rng = np.random.default_rng(0)
    residues = list("ACDEFGHIKLMNPQRSTVWY")
    lines = [f">p{i} protein {i}\n{''.join(rng.choice(residues, rng.integers(5, 90)))}\n" for i in range(40)]
    lines.insert(7, ">gap\nXXXXXXXXXXMK\n")
    lines.insert(20, ">broken\nMKT1AY\n")
    path.write_text("".join(lines))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A folder holding each source (image trees, FASTA file, captioned folder) and its optimized copy."""
    root = tmp_path_factory.mktemp("streaming")
    for name, colour in (("cat", (200, 0, 0)), ("dog", (0, 0, 200))):  # unsplit: held out by seed
        _write_images(root / "tree" / name, 10, colour)
    for split, count in (("train", 5), ("val", 2), ("test", 2)):
        for name, colour in (("a", (90, 0, 0)), ("b", (0, 90, 0))):
            _write_images(root / "splits" / split / name, count, colour)
    _write_fasta(root / "proteins.fasta")
    _write_images(root / "captioned", 10, (30, 60, 90))
    captions = [
        {"file": f"{i}.png", "caption": f"a picture number {i}", "label": "ab"[i % 2]} for i in range(10)
    ]
    (root / "captions.jsonl").write_text("\n".join(json.dumps(caption) for caption in captions))

    # the command line, with two conversion workers (the order must survive them)
    result = zoo("data", "optimize", "--format", "images", "tree", "tree.opt", "--num-workers", "2", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote tree.opt (20 records)" in result.stdout
    start_method = multiprocessing.get_start_method(allow_none=True)
    streaming.optimize("images", root / "splits", root / "splits.opt", chunk_bytes="2KB")
    streaming.optimize(
        "fasta", root / "proteins.fasta", root / "proteins.opt", chunk_bytes="1KB", on_invalid="skip"
    )
    streaming.optimize(
        "captioned", root / "captioned", root / "captioned.opt", captions_file=root / "captions.jsonl"
    )
    assert multiprocessing.get_start_method(allow_none=True) == start_method  # loaders still fork workers
    return root


# ------------------------------------------------------------------------------------------ helpers
def images(data_dir: Path, **kwargs) -> ImageClassificationDataModule:
    options = {"img_size": 16, "batch_size": 4, "val_fraction": 0.2, "seed": 3, "augment": True}
    return ImageClassificationDataModule(data_dir=str(data_dir), **{**options, **kwargs})


def proteins(fasta: Path, **kwargs) -> ProteinDataModule:
    options = {"max_tokens": 256, "max_length": 60, "val_fraction": 0.1, "test_fraction": 0.1}
    return ProteinDataModule(fasta=str(fasta), on_invalid="skip", **{**options, **kwargs})


def captioned(data_dir: Path, **kwargs) -> CaptionedImageDataModule:
    options = {
        "img_size": 32,
        "batch_size": 2,
        "resolution_buckets": True,
        "random_flip": True,
        "val_fraction": 0.2,
    }
    return CaptionedImageDataModule(data_dir=str(data_dir), **{**options, **kwargs})


#: (data module, source, its optimized directory) of the loaders with a resume and a DDP test
LOADERS = [(images, "tree", "tree.opt"), (proteins, "proteins.fasta", "proteins.opt")]
LOADER_IDS = ["images", "token-budgets"]


def both(make, *paths: Path) -> list:
    """The data module built on each path (a source, its optimized directory), set up for fitting."""
    modules = [make(path) for path in paths]
    for module in modules:
        module.setup("fit")
    return modules


def epoch(loader, number: int) -> list[dict]:
    _set_sampler_epoch(loader, number)  # what Lightning calls at every epoch start
    return list(loader)


def assert_same_batches(first: list[dict], second: list[dict]) -> None:
    assert len(first) == len(second) > 0
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key, value in a.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, b[key]), key
            else:
                assert value == b[key], key


# ------------------------------------------------------------------------------------------ same batches
def test_streamed_images_give_the_folders_augmented_batches(root):
    folder, streamed = both(images, root / "tree", root / "tree.opt")
    assert streamed.class_names == folder.class_names == ["cat", "dog"]
    for number in (0, 1):  # a new epoch, a new order and new augmentations, alike
        assert_same_batches(
            epoch(folder.train_dataloader(), number), epoch(streamed.train_dataloader(), number)
        )
    assert_same_batches(list(folder.val_dataloader()), list(streamed.val_dataloader()))
    assert_same_batches(list(folder.predict_dataloader()), list(streamed.predict_dataloader()))


def test_streamed_images_with_loader_workers(root):
    folder, streamed = both(images, root / "tree", root / "tree.opt")
    streamed.num_workers = 2  # each worker opens the directory itself
    assert_same_batches(epoch(folder.train_dataloader(), 2), epoch(streamed.train_dataloader(), 2))


def test_split_image_tree_keeps_its_splits(root):
    folder, streamed = both(images, root / "splits", root / "splits.opt")
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        assert_same_batches(list(getattr(folder, loader)()), list(getattr(streamed, loader)()))
    assert len(streamed.train_set) == 10 and len(streamed.val_set) == len(streamed.test_set) == 4
    assert next(iter(streamed.test_dataloader()))["id"] == ["a/0.png", "a/1.png", "b/0.png", "b/1.png"]


def test_streamed_fasta_gives_the_same_splits_and_token_budget_batches(root):
    folder, streamed = both(proteins, root / "proteins.fasta", root / "proteins.opt")
    assert streamed.skipped == folder.skipped == {"bad character": 1, "more than 50% X": 1}
    for split in ("train_set", "val_set", "test_set"):
        lengths = [getattr(module, split).token_lengths().tolist() for module in (folder, streamed)]
        assert lengths[0] == lengths[1]
    for number in (0, 1):  # random crops of the long sequences included
        assert_same_batches(
            epoch(folder.train_dataloader(), number), epoch(streamed.train_dataloader(), number)
        )
    assert_same_batches(list(folder.val_dataloader()), list(streamed.val_dataloader()))
    fixed = both(
        lambda f: proteins(f, max_tokens=None, batch_size=5), root / "proteins.fasta", root / "proteins.opt"
    )
    assert_same_batches(epoch(fixed[0].train_dataloader(), 0), epoch(fixed[1].train_dataloader(), 0))


def test_streamed_captioned_images_give_the_same_bucketed_batches(root):
    folder = captioned(root / "captioned", captions_file=str(root / "captions.jsonl"))
    streamed = captioned(root / "captioned.opt")
    assert streamed.class_names == folder.class_names == ["a", "b"]
    assert streamed.caption_vocabulary == folder.caption_vocabulary
    for module in (folder, streamed):
        module.setup("fit")
    batches = epoch(streamed.train_dataloader(), 1)
    assert_same_batches(epoch(folder.train_dataloader(), 1), batches)
    assert len({batch["image"].shape for batch in batches}) > 1  # several buckets
    assert_same_batches(list(folder.val_dataloader()), list(streamed.val_dataloader()))


# ------------------------------------------------------------------------------------------ resume, DDP
@pytest.mark.parametrize(("make", "source", "optimized"), LOADERS, ids=LOADER_IDS)
def test_a_killed_and_resumed_streamed_loader_continues_exactly(root, make, source, optimized):
    folder, killed = both(make, root / source, root / optimized)
    reference = epoch(folder.train_dataloader(), 1)
    loader = killed.train_dataloader()
    _set_sampler_epoch(loader, 1)
    iterator = iter(loader)
    consumed = [next(iterator) for _ in range(2)]
    state = loader.state_dict()
    assert state == {"batches_yielded": 2, "epoch": 1}

    (resumed,) = both(make, root / optimized)  # a new process: a new data module and loader
    loader = resumed.train_dataloader()
    loader.load_state_dict(state)
    assert len(loader) == len(reference)
    assert_same_batches(consumed + list(loader), reference)


def _rank_loaders(module, world: int) -> list[DataLoader]:
    """The module's training loader as Lightning re-builds it on each DDP rank (its DistributedSampler)."""
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = module.train_dataloader()
    shuffle, stage = _is_dataloader_shuffled(loader), RunningStage.TRAINING
    samplers = [
        _get_distributed_sampler(loader, shuffle, 0, stage, num_replicas=world, rank=rank, seed=0)
        for rank in range(world)
    ]
    return [_update_dataloader(loader, sampler, stage) for sampler in samplers]


def _padding(module, epoch_number: int) -> int:
    """Items a token-budget plan repeats so that both ranks run as many steps (none for images: 16 / 2 / 4)."""
    sampler = module.train_dataloader().batch_sampler
    if not hasattr(sampler, "epoch_batches"):
        return 0
    plan = sampler.epoch_batches(epoch_number)
    return sum(len(batch) for batch in padded_to_multiple(plan, 2)[len(plan) :])


@pytest.mark.parametrize(("make", "source", "optimized"), LOADERS, ids=LOADER_IDS)
def test_under_ddp_every_streamed_sample_is_seen_once_per_epoch(root, make, source, optimized):
    folder, streamed = both(make, root / source, root / optimized)
    ranks = [epoch(loader, 1) for loader in _rank_loaders(streamed, 2)]
    for ours, theirs in zip(ranks, [epoch(loader, 1) for loader in _rank_loaders(folder, 2)]):
        assert_same_batches(ours, theirs)  # each rank's share is the one it has on the source
    seen = [i for batches in ranks for batch in batches for i in batch.get("id", batch.get("ids"))]
    everything = [streamed.train_set[i]["id"] for i in range(len(streamed.train_set))]
    assert sorted(set(seen)) == sorted(everything)
    assert len(seen) - len(everything) == _padding(streamed, 1)  # repeats only where the plan is padded


class RecordIds(Callback):
    """Writes the ids of every training batch of its rank to ``folder/rank<r>.json``."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.seen = folder, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append(batch["ids"])

    def on_train_end(self, trainer, pl_module) -> None:
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.seen))


def _ddp_epoch(fasta: Path, folder: Path) -> list[list[list[str]]]:
    """One epoch of a tiny ESM-2 on two gloo processes; the batches' ids of each rank."""
    folder.mkdir()
    L.seed_everything(0)
    trainer = tiny_trainer(
        folder, devices=2, strategy="ddp_spawn", max_epochs=1, callbacks=[RecordIds(folder)]
    )
    model = ESM2MaskedLM(model_kwargs={"num_layers": 1, "embed_dim": 16, "attention_heads": 2})
    trainer.fit(model, proteins(fasta))
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.distributed
def test_a_real_ddp_epoch_on_streamed_proteins_is_the_source_epoch(root, tmp_path):
    streamed = _ddp_epoch(root / "proteins.opt", tmp_path / "streamed")
    assert streamed == _ddp_epoch(root / "proteins.fasta", tmp_path / "source")
    (module,) = both(proteins, root / "proteins.opt")
    everything = {module.train_set[i]["id"] for i in range(len(module.train_set))}
    assert {i for rank in streamed for batch in rank for i in batch} == everything


# ------------------------------------------------------------------------------------------ bad input
def test_an_incomplete_or_other_format_directory_is_named(root, tmp_path):
    with pytest.raises(ZooError, match=r"proteins\.opt' holds 'fasta' data .* reads 'images' data"):
        images(root / "proteins.opt")
    with pytest.raises(ZooError, match=r"tree\.opt' holds 'images' data .* reads 'fasta'"):
        proteins(root / "tree.opt").setup("fit")

    copy = tmp_path / "copy"  # an interrupted copy: the metadata without LitData's index
    copy.mkdir()
    (copy / streaming.METADATA).write_text((root / "tree.opt" / streaming.METADATA).read_text())
    with pytest.raises(MissingFileError, match=r"copy' has no index\.json"):
        images(copy)
    with pytest.raises(MissingFileError, match=r"copy' has no index\.json"):
        captioned(copy)

    (copy / "index.json").write_text((root / "splits.opt" / "index.json").read_text())
    with pytest.raises(ZooError, match=r"copy' is incomplete: its chunks hold 18 samples, .* says 20"):
        images(copy)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingFileError, match=r"empty' is a directory without LitData's index\.json"):
        proteins(empty)
    with pytest.raises(ValueError, match=r"captions_file does not apply to .*captioned\.opt'"):
        captioned(root / "captioned.opt", captions_file=str(root / "captions.jsonl"))


def test_optimize_refuses_to_overwrite_or_to_mix_in_other_files(root, tmp_path):
    with pytest.raises(ZooError, match=r"tree\.opt' already holds optimized data: pass --overwrite"):
        streaming.optimize("images", root / "tree", root / "tree.opt")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ZooError, match=r"exists and is not an empty directory"):
        streaming.optimize("images", root / "tree", tmp_path)
    with pytest.raises(ZooError, match=r"copy it to the object store"):
        streaming.optimize("images", root / "tree", "s3://bucket/tree")


def test_missing_litdata_names_the_extra(monkeypatch, root):
    monkeypatch.setitem(sys.modules, "litdata", None)  # what an environment without it imports
    with pytest.raises(MissingExtraError, match=r"pip install 'lightning-zoo\[streaming\]'"):
        images(root / "tree.opt")


def test_optimize_command_help_and_bad_arguments(tmp_path):
    result = zoo("data", "optimize", "--help", cwd=tmp_path)
    assert result.returncode == 0 and "--format {images,fasta,captioned}" in result.stdout
    result = zoo("data", "optimize", "--format", "images", "nowhere", "out", cwd=tmp_path)
    assert result.returncode == 2 and "zoo: error: image folder 'nowhere' does not exist" in result.stderr
    result = zoo(
        "data", "optimize", "--format", "fasta", "a.fasta", "out", "--captions-file", "c", cwd=tmp_path
    )
    assert result.returncode == 2 and "--captions-file applies to --format captioned" in result.stderr
    result = zoo("data", "optimize", "--format", "text", "a", "b", cwd=tmp_path)
    assert result.returncode == 2 and "invalid choice: 'text'" in result.stderr
    result = zoo("data", "optimize", "--format", "images", "a", "b", "--chunk-bytes", "64XB", cwd=tmp_path)
    assert result.returncode == 2 and "--chunk-bytes: not a size: '64XB'" in result.stderr
