"""Image classification data: the embedded shapes set by default, an image-folder tree otherwise.

Real data is a folder with one sub-folder per class, either split already
(``root/train/<class>/*``, ``root/val/<class>/*``, optional ``root/test/<class>/*``) or not
(``root/<class>/*``, split by ``val_fraction`` with a fixed seed). Problems with it (a missing
path, an empty class folder, an unreadable image, a class count that disagrees with
``num_classes``) are reported when the data module is built, before any training starts.

Such a folder converted by ``zoo data optimize --format images`` (``zoo.streaming``) is read the same
way from its optimized directory or that directory's object-store URL, given as ``data_dir``: same
splits, same batches, same augmentations.

Prediction runs on the test split, or on the user's own images given as ``predict_path``: a folder
(searched recursively), one image file, or a text file listing image paths (one a line, relative to
the list's folder; blank lines and ``#`` comments skipped). Those are read with the evaluation
transform and identified by their path relative to ``predict_path``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import ClassVar

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Subset

from zoo import streaming
from zoo.datamodules.shapes import COLOURS, SHAPES, ShapesDataset
from zoo.datamodules.splits import SplitDataModule
from zoo.errors import MissingFileError, ZooError
from zoo.resume import ResumableDataLoader
from zoo.serving import RequestCodec, image_field, text_field

__all__ = [
    "ImageClassificationDataModule",
    "ImageFileDataset",
    "ImageFolderDataset",
    "ImageRequestCodec",
    "StreamedImageDataset",
    "folder_layout",
    "predict_image_files",
]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
NORMALIZE_MEAN = (0.5, 0.5, 0.5)
NORMALIZE_STD = (0.5, 0.5, 0.5)


def _class_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        raise MissingFileError(f"image folder {str(root)!r} does not exist or is not a directory")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ZooError(
            f"image folder {str(root)!r} has no class sub-folders (expected {root}/<class>/<image>)"
        )
    return folders


def _image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ZooError(
            f"class folder {str(folder)!r} contains no images (looked for {sorted(IMAGE_SUFFIXES)})"
        )
    return files


def folder_layout(root: Path) -> dict[str, Path] | None:
    """The split folders of a split tree (``train``, ``val``, and ``test`` when present), or ``None`` for a
    tree of class folders, which is split by seed."""
    if not (root / "train").is_dir():
        return None
    if not (root / "val").is_dir():
        raise MissingFileError(f"{str(root)!r} has a train/ folder but no val/ folder next to it")
    splits = ("train", "val", "test")
    return {split: root / split for split in splits if (root / split).is_dir()}


def predict_image_files(path: str | Path) -> list[tuple[Path, str]]:
    """``(file, id)`` of each image ``path`` names: a folder (recursively), an image, or a list of images.

    The id is the file's path relative to the folder, the image's name, or the line of the list.
    """
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"predict_path {str(path)!r} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        found = [(file, file.relative_to(path).as_posix()) for file in files]
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        found = [(path, path.name)]
    else:
        found = _listed_images(path)
    if not found:
        raise ZooError(f"predict_path {str(path)!r} holds no images (looked for {sorted(IMAGE_SUFFIXES)})")
    return found


def _listed_images(list_file: Path) -> list[tuple[Path, str]]:
    try:
        lines = list_file.read_text().splitlines()
    except UnicodeDecodeError as error:
        raise ZooError(
            f"predict_path {str(list_file)!r} is neither an image ({sorted(IMAGE_SUFFIXES)}) "
            "nor a text file listing image paths"
        ) from error
    found = []
    for number, line in enumerate(lines, start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        file = list_file.parent / entry  # an absolute entry stays absolute
        if not file.is_file():
            raise MissingFileError(f"{str(list_file)!r}, line {number}: image {entry!r} does not exist")
        found.append((file, entry))
    return found


def _load_rgb(path: Path | io.BytesIO, transform):
    with Image.open(path) as image:
        image = image.convert("RGB")
    return transform(image) if transform is not None else image


def _verify_readable(path: Path) -> None:
    try:
        with Image.open(path) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ZooError(f"unreadable image {str(path)!r}: {error}") from error


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>`` as ``{"image", "label", "caption", "id"}`` items.

    The caption is the class name, the id the image's path relative to ``root``.
    """

    def __init__(self, root: str | Path, class_names: list[str] | None = None, transform=None, verify=True):
        root = Path(root)
        folders = _class_folders(root)
        found = [f.name for f in folders]
        if class_names is not None and found != class_names:
            raise ZooError(f"classes in {str(root)!r} are {found}, but the training split has {class_names}")
        self.class_names = found
        self.root = root
        self.samples = [
            (path, label) for label, folder in enumerate(folders) for path in _image_files(folder)
        ]
        if verify:
            for path, _ in self.samples:
                _verify_readable(path)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        path, label = self.samples[index]
        return {
            "image": _load_rgb(path, self.transform),
            "label": label,
            "caption": self.class_names[label],
            "id": path.relative_to(self.root).as_posix(),
        }


class StreamedImageDataset(Dataset):
    """Records ``positions`` of an optimized image directory (``zoo.streaming``) as the items
    ``ImageFolderDataset`` gives for the same files: the stored bytes are the image files' own."""

    def __init__(self, records, class_names: list[str], positions: range, transform=None) -> None:
        self.records, self.class_names, self.positions = records, class_names, positions
        self.transform = transform

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int) -> dict:
        sample = self.records[self.positions[index]]
        return {
            "image": _load_rgb(io.BytesIO(sample["image"]), self.transform),
            "label": sample["label"],
            "caption": self.class_names[sample["label"]],
            "id": sample["id"],
        }


class ImageFileDataset(Dataset):
    """Unlabelled images as ``{"image", "id"}`` items, from ``(file, id)`` pairs (``predict_image_files``)."""

    def __init__(self, files: list[tuple[Path, str]], transform=None, verify: bool = True) -> None:
        self.files = files
        if verify:
            for path, _ in files:
                _verify_readable(path)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        path, item_id = self.files[index]
        return {"image": _load_rgb(path, self.transform), "id": item_id}


class _WithIndexIds(Dataset):
    """A dataset whose items get their index as ``"id"`` unless they carry one (a file path)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {"id": str(index), **self.dataset[index]}


class ImageRequestCodec(RequestCodec):
    """``zoo serve`` requests for an image classifier: ``{"image": base64, "id": optional}`` (or the image as a
    multipart upload), read with the evaluation transform ``zoo predict`` applies to image files."""

    fields = {"image": "the image, base64-encoded (PNG, JPEG, ...) or a multipart upload",
              "id": "optional name, echoed in the answer"}  # fmt: skip
    image_fields = ("image",)

    def __init__(self, transform) -> None:
        self.transform = transform

    def parse(self, payload) -> dict:
        payload = self.check_keys(payload)
        item_id = text_field(payload, "id", required=False, default="request", max_length=1000)
        return {"image": self.transform(image_field(payload, "image")), "id": item_id}

    def collate(self, items) -> dict:
        return {"image": torch.stack([item["image"] for item in items]), "id": [item["id"] for item in items]}


class _ShapesAugment:
    """Light, label-preserving augmentation for tensors: a random shift (pad + crop) and a flip."""

    def __init__(self, pad: int = 2) -> None:
        self.pad = pad

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        _, h, w = image.shape
        padded = torch.nn.functional.pad(image[None], [self.pad] * 4, mode="replicate")[0]
        top, left = (int(v) for v in torch.randint(0, 2 * self.pad + 1, (2,)))
        image = padded[:, top : top + h, left : left + w]
        return image.flip(-1) if torch.rand(()) < 0.5 else image


class _Normalize:
    def __init__(self, augment=None) -> None:
        self.augment = augment
        self.mean = torch.tensor(NORMALIZE_MEAN).view(3, 1, 1)
        self.std = torch.tensor(NORMALIZE_STD).view(3, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.augment is not None:
            image = self.augment(image)
        return (image - self.mean) / self.std


class ImageClassificationDataModule(SplitDataModule):
    """Image batches ``{"image": (B, 3, H, W), "label": (B,), "caption": list[str]}``, plus ``"id"`` (the
    file paths) for image folders.

    Predict batches are ``{"image", "id": list[str]}`` (and the labels, when predicting the test split).

    Args:
        data_dir: an image-folder tree (see module docstring), a directory written from one by
            ``zoo data optimize --format images``, or that directory's URL (``s3://...``); ``None`` uses
            the embedded shapes.
        img_size: side of the square images the model sees.
        num_classes: the class count you expect; checked against the data when given.
        train_size / val_size / test_size: number of embedded images per split.
        val_fraction: share of an unsplit image folder held out for validation.
        seed: fixes the embedded images and the folder split.
        augment: random shift + flip (embedded) or timm's training transform (folders).
        verify_images: open every image of a folder once at set-up, so a bad file is named
            before training rather than crashing a worker hours in (``zoo data optimize`` does it when
            writing an optimized directory).
        predict_path: the images to predict (a folder, an image, or a text file listing images; see
            the module docstring); ``None`` predicts the test split.
    """

    #: data attribute -> model argument, fed by ``zoo fit`` into models that take the argument
    model_links: ClassVar[dict[str, str]] = {
        "num_classes": "num_classes",
        "img_size": "img_size",
        "class_names": "class_names",
    }

    def __init__(
        self,
        data_dir: str | None = None,
        img_size: int = 32,
        batch_size: int = 128,
        num_workers: int = 0,
        num_classes: int | None = None,
        train_size: int = 8000,
        val_size: int = 1000,
        test_size: int = 1000,
        val_fraction: float = 0.1,
        seed: int = 0,
        augment: bool = True,
        verify_images: bool = True,
        predict_path: str | None = None,
    ) -> None:
        super().__init__()
        # num_classes is a check, not a setting: the model's value comes from `self.num_classes`.
        self.save_hyperparameters(ignore=["num_classes"])
        self.optimized = (
            streaming.open_optimized(data_dir, "images") if streaming.is_optimized(data_dir) else None
        )
        self.data_dir = Path(data_dir) if data_dir and self.optimized is None else None
        self.img_size = img_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.class_names = self._discover_classes()
        if num_classes is not None and num_classes != len(self.class_names):
            source = data_dir or "the embedded shapes set"
            raise ZooError(
                f"num_classes={num_classes} disagrees with the data: {source} has "
                f"{len(self.class_names)} classes ({', '.join(self.class_names)})"
            )
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.predict_files = predict_image_files(predict_path) if predict_path else None
        self.predict_set: Dataset | None = None

    @property
    def num_classes(self) -> int:
        """Determined by the data; the CLI links it into the model's ``num_classes``."""
        return len(self.class_names)

    def _discover_classes(self) -> list[str]:
        if self.optimized is not None:
            return self.optimized.metadata["class_names"]
        if self.data_dir is None:
            return [f"{c} {s}" for s in SHAPES for c in COLOURS]
        root = self.data_dir / "train" if (self.data_dir / "train").is_dir() else self.data_dir
        return [f.name for f in _class_folders(root)]

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        if stage == "predict" and self.predict_files is not None:
            if self.predict_set is None:
                _, eval_tf = self._folder_transforms()
                verify = self.hparams.verify_images
                self.predict_set = ImageFileDataset(self.predict_files, transform=eval_tf, verify=verify)
            return
        if self.train_set is not None:
            return
        if self.optimized is not None:
            self._setup_optimized()
        elif self.data_dir is None:
            self._setup_shapes()
        else:
            self._setup_folders()

    def _setup_shapes(self) -> None:
        hp = self.hparams
        common = {"seed": hp.seed, "img_size": self.img_size}
        train_transform = _Normalize(_ShapesAugment() if hp.augment else None)
        self.train_set = ShapesDataset(hp.train_size, split="train", transform=train_transform, **common)
        self.val_set = ShapesDataset(hp.val_size, split="val", transform=_Normalize(), **common)
        self.test_set = ShapesDataset(hp.test_size, split="test", transform=_Normalize(), **common)

    def _folder_transforms(self):
        from timm.data import create_transform

        common = {"input_size": self.img_size, "mean": NORMALIZE_MEAN, "std": NORMALIZE_STD}
        train = create_transform(is_training=self.hparams.augment, **common)
        return train, create_transform(is_training=False, **common)

    def _setup_folders(self) -> None:
        train_tf, eval_tf = self._folder_transforms()
        root, verify = self.data_dir, self.hparams.verify_images
        layout = folder_layout(root)
        if layout is None:
            full_train = ImageFolderDataset(root, transform=train_tf, verify=verify)
            self._hold_out(full_train, ImageFolderDataset(root, transform=eval_tf, verify=False), root)
            return
        self.train_set = ImageFolderDataset(layout["train"], transform=train_tf, verify=verify)
        names = self.train_set.class_names
        self.val_set = ImageFolderDataset(layout["val"], names, transform=eval_tf, verify=verify)
        self.test_set = self.val_set
        if "test" in layout:
            self.test_set = ImageFolderDataset(layout["test"], names, transform=eval_tf, verify=verify)

    def _setup_optimized(self) -> None:
        """The splits of an optimized directory: its split ranges, or the seeded hold-out of ``_hold_out``."""
        train_tf, eval_tf = self._folder_transforms()
        records, names, splits = self.optimized.records(), self.class_names, self.optimized.metadata["splits"]

        def split(positions: range, transform) -> StreamedImageDataset:
            return StreamedImageDataset(records, names, positions, transform)

        if splits is None:
            everything = range(len(records))
            self._hold_out(split(everything, train_tf), split(everything, eval_tf), self.optimized.location)
            return
        self.train_set = split(range(*splits["train"]), train_tf)
        self.val_set = split(range(*splits["val"]), eval_tf)
        self.test_set = split(range(*splits["test"]), eval_tf) if "test" in splits else self.val_set

    def _hold_out(self, full_train: Dataset, full_eval: Dataset, source) -> None:
        """Validation (and test) split of an unsplit tree: a share of the images chosen by the seed."""
        order = torch.randperm(len(full_train), generator=torch.Generator().manual_seed(self.hparams.seed))
        n_val = max(1, round(len(order) * self.hparams.val_fraction))
        if n_val >= len(order):
            raise ZooError(f"{str(source)!r} has {len(order)} images: too few to hold out a validation split")
        self.train_set = Subset(full_train, order[n_val:].tolist())
        self.val_set = Subset(full_eval, order[:n_val].tolist())
        self.test_set = self.val_set

    # ------------------------------------------------------------ dataloaders
    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle and len(dataset) > self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def request_codec(self) -> ImageRequestCodec:
        """What ``zoo serve`` reads: one image per request, transformed as ``predict_path`` images are."""
        return ImageRequestCodec(self._folder_transforms()[1])

    def predict_dataloader(self) -> DataLoader:
        """The ``predict_path`` images, else the test split; every item carries an ``"id"``."""
        dataset = self.predict_set if self.predict_set is not None else _WithIndexIds(self.test_set)
        return self._loader(dataset, shuffle=False)
