"""A handful of images of one new concept: what DreamBooth and textual inversion personalise a model with.

Personalisation starts from a trained model and a few (3 to 8) pictures of one "instance" (a particular
dog, a toy; here by default a shape in a colour the embedded shapes never use, ``NOVEL_COLOURS``). The
images are served over and over (``repeats`` times an epoch), in batches of a few; nothing is held out, so
validation reads the same images (its loss says how well the instance is fitted, nothing more).

Items are ``{"image" in [-1, 1], "label": -1, "caption", "index"}``: label -1 says "not a class of the base
model", which the personalising module binds to its identifier (a new class id, ``zoo.diffusion.dreambooth``);
``caption`` is the ``caption`` argument, a template with ``{}`` where textual inversion
(``zoo.diffusion.textual_inversion``) puts its placeholder token. A folder is every image in it (not recursive),
each resized to cover ``img_size`` and centre-cropped; an empty or missing folder is an error that names it.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from zoo.datamodules.captioned_images import _captioned_item, shapes_caption_vocabulary
from zoo.datamodules.images import IMAGE_SUFFIXES, _verify_readable
from zoo.datamodules.shapes import COLOURS, NOVEL_COLOURS, SHAPES, render_shapes
from zoo.datamodules.splits import SplitDataModule
from zoo.errors import ZooError
from zoo.resume import ResumableDataLoader

__all__ = ["InstanceImageDataModule", "instance_images", "read_instance_folder"]

#: How many instance images personalisation is meant for (DreamBooth's paper uses 3 to 5).
RECOMMENDED_IMAGES = (3, 8)


def instance_images(num_images: int, shape: str, colour: str, img_size: int, seed: int = 0) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1]: the embedded instance, ``shape`` in ``colour`` at random positions, sizes and
    angles over the shapes' backgrounds, drawn clean (as ``CaptionedImageDataModule`` draws the shapes)."""
    if shape not in SHAPES:
        raise ZooError(f"instance shape {shape!r} is not one of {SHAPES}")
    known = {**COLOURS, **NOVEL_COLOURS}
    if colour not in known:
        raise ZooError(f"instance colour {colour!r} is not one of {tuple(known)}")
    images = []
    for index in range(num_images):
        sample = render_shapes(
            index,
            seed=seed,
            split="instance",
            image_size=img_size,
            shapes=(shape,),
            colours=(colour,),
            noise=0.0,
        )
        images.append(torch.from_numpy(sample.image).permute(2, 0, 1).float().div(127.5).sub(1.0))
    return torch.stack(images)


def read_instance_folder(folder: str | Path) -> list[Path]:
    """The image files directly inside ``folder``, sorted; an error when there are none."""
    root = Path(folder)
    if not root.is_dir():
        raise ZooError(f"instance folder {str(root)!r} does not exist or is not a directory")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ZooError(
            f"instance folder {str(root)!r} contains no images (looked for {sorted(IMAGE_SUFFIXES)}): "
            "put the 3-8 pictures of the instance in it"
        )
    for path in files:
        _verify_readable(path)
    return files


class _InstanceSet(Dataset):
    """The instance images, each served ``repeats`` times."""

    def __init__(self, images: torch.Tensor, caption: str, repeats: int) -> None:
        self.images, self.caption, self.repeats = images, caption, repeats

    def __len__(self) -> int:
        return len(self.images) * self.repeats

    def __getitem__(self, index: int) -> dict:
        index %= len(self.images)
        return {"image": self.images[index], "label": -1, "caption": self.caption, "index": index}


class InstanceImageDataModule(SplitDataModule):
    """The few images of the concept to personalise a model with (see the module docstring).

    Args:
        data_dir: a folder of the instance's images; ``None`` draws the embedded instance.
        num_images: embedded instance only: how many pictures of it.
        shape / colour: embedded instance only: the shape and its colour (``yellow`` is in no shapes split).
        caption: the caption of every instance image, for caption-conditioned models; ``{}`` marks where a
            textual-inversion placeholder token goes.
        img_size: side of the square images (linked into the model's ``img_size``).
        num_classes: the class count of the model being personalised (12 for the shapes), linked into the
            model's ``num_classes``; the new identifier's id comes after these and the null class.
        batch_size: instance images per step (DreamBooth adds as many class images).
        repeats: each image is seen this many times an epoch.
        seed: the embedded instance's drawing and the shuffling.
    """

    #: data attribute -> model argument, fed by ``zoo fit`` into models that take the argument
    model_links: ClassVar[dict[str, str]] = {
        "num_classes": "num_classes",
        "img_size": "img_size",
        "caption_vocabulary": "caption_vocabulary",
    }

    def __init__(
        self,
        data_dir: str | None = None,
        num_images: int = 5,
        shape: str = "circle",
        colour: str = "yellow",
        caption: str = "a medium {} in the centre",
        img_size: int = 32,
        num_classes: int = 12,
        batch_size: int = 4,
        repeats: int = 100,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if data_dir is None and num_images < 1:
            raise ZooError(f"num_images must be >= 1, got {num_images}")
        if repeats < 1:
            raise ZooError(f"repeats must be >= 1, got {repeats}")
        self.img_size = img_size
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.files = read_instance_folder(data_dir) if data_dir is not None else None
        count = len(self.files) if self.files is not None else num_images
        low, high = RECOMMENDED_IMAGES
        if not low <= count <= high:
            rank_zero_warn(f"{count} instance images: personalisation is meant for {low} to {high}")

    @property
    def caption_vocabulary(self) -> list[str]:
        """The words of the model being personalised: the shapes' (``TextualInversion`` takes a base
        checkpoint's own vocabulary instead)."""
        return shapes_caption_vocabulary()

    def images(self) -> torch.Tensor:
        """All instance images, (N, 3, H, W) in [-1, 1]."""
        hp = self.hparams
        if self.files is None:
            return instance_images(hp.num_images, hp.shape, hp.colour, self.img_size, hp.seed)
        size = (self.img_size, self.img_size)
        return torch.stack([_captioned_item(path, "", -1, 0, size)["image"] for path in self.files])

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images = self.images()
        self.train_set = _InstanceSet(images, self.hparams.caption, self.hparams.repeats)
        self.val_set = self.test_set = _InstanceSet(images, self.hparams.caption, 1)

    @staticmethod
    def _collate(items: list[dict]) -> dict:
        return {
            "image": torch.stack([i["image"] for i in items]),
            "label": torch.tensor([i["label"] for i in items]),
            "caption": [i["caption"] for i in items],
            "index": torch.tensor([i["index"] for i in items]),
        }

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle and len(dataset) > self.batch_size,
            collate_fn=self._collate,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )
