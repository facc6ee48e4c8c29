"""Images with captions (and class labels) for the diffusion family.

By default the embedded shapes (``zoo.datamodules.shapes.render_shapes``, the same images the vision
family classifies) without their sensor noise: a generative model would otherwise spend its capacity
on i.i.d. pixel noise, and an autoencoder's PSNR would be capped near 28 dB by noise it cannot (and
should not) encode. ``noise`` puts it back. Real data is a folder of images with captions, either one
``.txt`` file next to each image (``cat.png`` + ``cat.txt``) or a JSONL file
(``{"file": "cat.png", "caption": "...", "label": "cat"}`` per line; ``label`` optional), split by
``val_fraction`` with a fixed seed. Problems (a missing caption, an unreadable image, a malformed JSONL
line) are reported with the file and line when the data module is set up. Such a folder converted by
``zoo data optimize --format captioned`` (``zoo.streaming``) is read from its optimized directory, or that
directory's object-store URL, given as ``data_dir``: its metadata holds the image sizes (for resolution
buckets), class names and caption vocabulary, and the batches are the folder's.

Batches are ``{"image": (B, 3, H, W) in [-1, 1], "label": (B,), "caption": list[str], "index": (B,)}``;
``label`` is -1 where the data has none; ``index`` identifies the image within its dataset (what a
latent cache is keyed by). Only ``random_flip`` changes an image between epochs.

``predict_dataloader`` serves prompts for ``zoo predict``: those of the text file ``predict_path`` (one per
line: a class name, a class index, or a free caption; ``#`` comments and blank lines skipped), or one per
class. Prompt batches are ``{"caption", "label" (-1 for a free caption), "index", "name" (the line)}``.
``zoo serve`` reads one prompt per request (``PromptRequestCodec``, ``{"prompt": ...}`` or ``{"class": ...}``)
into the same batches, with per-request ``"seed"`` and ``"id"`` lists added.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from zoo import streaming
from zoo.datamodules import buckets as bucketing
from zoo.datamodules.images import IMAGE_SUFFIXES, _verify_readable
from zoo.datamodules.shapes import COLOURS, SHAPES, SPLITS, render_shapes
from zoo.datamodules.splits import SplitDataModule
from zoo.resume import ResumableDataLoader
from zoo.serving import RequestCodec, RequestError, class_name, integer_field, model_argument, text_field

__all__ = [
    "CaptionedFolderDataset",
    "CaptionedImageDataModule",
    "CaptionedShapesDataset",
    "PromptRequestCodec",
    "StreamedCaptionedDataset",
    "caption_vocabulary",
    "collate_prompts",
    "prompt_item",
    "read_captioned_folder",
    "tokenize_words",
]

_WORD = re.compile(r"[a-z0-9]+")


def tokenize_words(text: str) -> list[str]:
    """Lower-case word tokens: the unit of the caption vocabulary."""
    return _WORD.findall(text.lower())


def caption_vocabulary(captions: Iterable[str]) -> list[str]:
    """The sorted words of ``captions``: what the model's caption tokenizer knows."""
    return sorted({word for caption in captions for word in tokenize_words(caption)})


def shapes_caption_vocabulary() -> list[str]:
    """Every word the shapes captions use ("a {size} {colour} {shape} in the {row} {column}")."""
    words = ["a", "in", "the", "small", "medium", "large", *COLOURS, *SHAPES]
    words += ["top", "middle", "bottom", "left", "centre", "right"]
    return sorted(set(words))


class CaptionedShapesDataset(Dataset):
    """A split of the shapes as ``{"image" in [-1, 1], "label", "caption"}``, rendered on first access."""

    def __init__(self, size: int, *, split: str, seed: int, img_size: int, noise: float = 0.0) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        if size < 1:
            raise ValueError(f"a shapes split needs at least one image, got size={size}")
        self.class_names = [f"{c} {s}" for s in SHAPES for c in COLOURS]
        self._args = {"seed": seed, "split": split, "image_size": img_size, "noise": noise}
        self._cache: list[dict | None] = [None] * size

    def __len__(self) -> int:
        return len(self._cache)

    def __getitem__(self, index: int) -> dict:
        item = self._cache[index]
        if item is None:
            sample = render_shapes(index, **self._args)
            image = torch.from_numpy(sample.image).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
            item = {"image": image, "label": sample.label, "caption": sample.caption, "index": index}
            self._cache[index] = item
        return item


def _read_jsonl(path: Path, root: Path) -> list[tuple[Path, str, object]]:
    if not path.is_file():
        raise FileNotFoundError(f"captions file {str(path)!r} does not exist")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from error
        if not isinstance(record, dict) or not isinstance(record.get("file"), str):
            raise ValueError(f"{path}:{number}: expected an object with a string 'file' field")
        if not isinstance(record.get("caption"), str):
            raise ValueError(f"{path}:{number}: expected a string 'caption' field")
        image = root / record["file"]
        if not image.is_file():
            raise FileNotFoundError(f"{path}:{number}: image {str(image)!r} does not exist")
        records.append((image, record["caption"], record.get("label")))
    if not records:
        raise ValueError(f"captions file {str(path)!r} has no records")
    return records


def _read_txt_pairs(root: Path) -> list[tuple[Path, str, object]]:
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a directory")
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(
            f"image folder {str(root)!r} contains no images (looked for {sorted(IMAGE_SUFFIXES)})"
        )
    records = []
    for image in images:
        caption = image.with_suffix(".txt")
        if not caption.is_file():
            raise FileNotFoundError(f"image {str(image)!r} has no caption file {caption.name!r} next to it")
        records.append((image, caption.read_text().strip(), None))
    return records


def read_captioned_folder(
    root: str | Path, captions_file: str | Path | None, verify: bool = True
) -> tuple[list[tuple[Path, str, int]], list[str]]:
    """``(image, caption, label)`` of every image (label -1 where there is none), and the class names: the
    labels' sorted string forms, which the labels index."""
    root = Path(root)
    records = _read_jsonl(Path(captions_file), root) if captions_file else _read_txt_pairs(root)
    names = sorted({str(label) for _, _, label in records if label is not None})
    index = {name: i for i, name in enumerate(names)}
    records = [(p, c, index[str(label)] if label is not None else -1) for p, c, label in records]
    if verify:
        for path, _, _ in records:
            _verify_readable(path)
    return records, names


def image_size(path: Path) -> tuple[int, int]:
    """``(height, width)`` from the image's header."""
    from PIL import Image

    with Image.open(path) as image:
        return image.height, image.width


def _cover_and_crop(image, height: int, width: int):
    """Resize (bicubic) so the image covers ``height x width``, then crop the centre: nothing is squashed."""
    from PIL import Image

    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    resized = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def _captioned_item(image_file, caption: str, label: int, index: int, size: tuple[int, int]) -> dict:
    """A folder's item: the image covering ``size`` (centre-cropped) in [-1, 1], with its caption and label."""
    from PIL import Image
    from torchvision.transforms.functional import normalize, to_tensor

    with Image.open(image_file) as image:
        tensor = normalize(to_tensor(_cover_and_crop(image.convert("RGB"), *size)), [0.5] * 3, [0.5] * 3)
    return {"image": tensor, "label": label, "caption": caption, "index": index}


def _nearest_buckets(sizes: Iterable[tuple[int, int]], buckets: list[tuple[int, int]]) -> list[int]:
    return [bucketing.nearest_bucket(height, width, buckets) for height, width in sizes]


class CaptionedFolderDataset(Dataset):
    """Images with captions from a folder (``.txt`` per image) or a JSONL file, resized and centre-cropped.

    Every image becomes ``img_size x img_size``, or, given ``buckets`` (``(height, width)`` pairs from
    ``zoo.datamodules.buckets.resolution_buckets``), the bucket closest to its own aspect ratio
    (``bucket_of[i]``), so that wide and tall pictures keep their framing.
    """

    def __init__(
        self,
        root: str | Path,
        captions_file: str | Path | None,
        img_size: int,
        verify: bool = True,
        buckets: list[tuple[int, int]] | None = None,
    ):
        self.records, self.class_names = read_captioned_folder(root, captions_file, verify)
        self.buckets = buckets or [(img_size, img_size)]
        self.bucket_of = [0] * len(self.records)
        if buckets:  # reads each image's header
            self.bucket_of = _nearest_buckets((image_size(path) for path, _, _ in self.records), buckets)

    def caption_vocabulary(self) -> list[str]:
        return caption_vocabulary(caption for _, caption, _ in self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        path, caption, label = self.records[index]
        return _captioned_item(path, caption, label, index, self.buckets[self.bucket_of[index]])


class StreamedCaptionedDataset(Dataset):
    """``CaptionedFolderDataset`` read from an optimized directory (``zoo.streaming``): the same items, the
    buckets chosen from the image sizes in the metadata, the images decoded from the files' own bytes."""

    def __init__(
        self,
        optimized: streaming.OptimizedData,
        img_size: int,
        buckets: list[tuple[int, int]] | None = None,
    ) -> None:
        metadata = optimized.metadata
        self.records = optimized.records()
        self.class_names: list[str] = metadata["class_names"]
        self.buckets = buckets or [(img_size, img_size)]
        sizes = optimized.arrays["sizes"].tolist()
        self.bucket_of = _nearest_buckets(sizes, buckets) if buckets else [0] * len(self.records)
        self._vocabulary: list[str] = metadata["caption_vocabulary"]

    def caption_vocabulary(self) -> list[str]:
        return list(self._vocabulary)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        sample = self.records[index]
        size = self.buckets[self.bucket_of[index]]
        return _captioned_item(io.BytesIO(sample["image"]), sample["caption"], sample["label"], index, size)


class _RandomFlips(Dataset):
    """Training images flipped left-right with probability 1/2, drawn per sample: the zoo's loader seeds each
    sample's draws by ``(seed, epoch, index)``, so a resumed run flips the images the killed one would have."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    @property
    def indices(self) -> list[int]:
        """The wrapped split's indices into the folder (the resolution buckets group by them)."""
        return self.dataset.indices

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        return {**item, "image": item["image"].flip(-1)} if torch.rand(()) < 0.5 else item


class _Prompts(Dataset):
    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


class CaptionedImageDataModule(SplitDataModule):
    """Captioned, labelled images for the autoencoder and latent diffusion (see module docstring).

    Args:
        data_dir: a folder of images with captions, a directory written from one by ``zoo data optimize
            --format captioned``, or that directory's URL (``s3://...``); ``None`` uses the embedded shapes.
        captions_file: a JSONL file of ``{"file", "caption", "label"?}`` records (paths relative to
            ``data_dir``); without it each image needs a ``.txt`` caption beside it.
        img_size: side of the square images (linked into the model's ``img_size``).
        noise: pixel-noise std (fraction of 255) of the embedded shapes; 0 draws them clean.
        random_flip: horizontal flips. Off by default: the shapes captions name left and right.
        predict_path: a text file of prompts for ``zoo predict``, one per line; default: one per class.
        resolution_buckets: folder data only: serve each image at the aspect-ratio bucket closest to its own
            (about ``img_size**2`` pixels, sides multiples of ``bucket_step``, at most ``max_aspect_ratio``),
            every batch from one bucket, instead of a centre crop to a square.
        bucket_step: side granularity of the buckets; a multiple of the model's total downsampling
            (autoencoder factor x denoiser's) so each latent divides evenly.
        max_aspect_ratio: the most elongated bucket, either way.
        crop_scales: embedded shapes only: each training image is its scene rendered at ``img_size * s``
            for an ``s`` drawn from this list (its original size; 1 = uncropped) and cropped to ``img_size``
            at a random position; batches then carry ``original_size`` and ``crop_top_left`` (B, 2), what
            SDXL-style micro-conditioning reads (``zoo.datamodules.crops``). Validation stays uncropped.
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
        captions_file: str | None = None,
        img_size: int = 32,
        batch_size: int = 64,
        num_workers: int = 0,
        train_size: int = 8000,
        val_size: int = 256,
        test_size: int = 256,
        val_fraction: float = 0.1,
        noise: float = 0.0,
        random_flip: bool = False,
        seed: int = 0,
        predict_path: str | None = None,
        verify_images: bool = True,
        resolution_buckets: bool = False,
        bucket_step: int = 8,
        max_aspect_ratio: float = 2.0,
        crop_scales: list[float] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if resolution_buckets and data_dir is None:
            raise ValueError("resolution_buckets needs data_dir: the embedded shapes are all square")
        if crop_scales and data_dir is not None:
            raise ValueError("crop_scales renders the embedded shapes larger: it needs data_dir=None")
        self.data_dir = data_dir
        self.img_size = img_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self._folder: CaptionedFolderDataset | StreamedCaptionedDataset | None = None
        if data_dir is not None:
            buckets = (
                bucketing.resolution_buckets(img_size, bucket_step, max_aspect_ratio)
                if resolution_buckets
                else None
            )
            if streaming.is_optimized(data_dir):
                if captions_file is not None:
                    raise ValueError(
                        f"captions_file does not apply to {data_dir!r}: an optimized directory holds its "
                        "captions (zoo data optimize --captions-file)"
                    )
                optimized = streaming.open_optimized(data_dir, "captioned")
                self._folder = StreamedCaptionedDataset(optimized, img_size, buckets)
            else:
                self._folder = CaptionedFolderDataset(
                    data_dir, captions_file, img_size, verify=verify_images, buckets=buckets
                )
            self.class_names = self._folder.class_names
        else:
            self.class_names = [f"{c} {s}" for s in SHAPES for c in COLOURS]

    @property
    def num_classes(self) -> int:
        """Linked into the model's ``num_classes`` by the CLI."""
        return len(self.class_names)

    @property
    def caption_vocabulary(self) -> list[str]:
        """The words of the training captions; linked into the model's caption tokenizer by the CLI."""
        if self._folder is None:
            return shapes_caption_vocabulary()
        return self._folder.caption_vocabulary()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        if self._folder is None:
            common = {"seed": hp.seed, "img_size": self.img_size, "noise": hp.noise}
            if hp.crop_scales:
                from zoo.datamodules.crops import RandomCropShapes

                self.train_set = RandomCropShapes(
                    hp.train_size, split="train", scales=hp.crop_scales, **common
                )
            else:
                self.train_set = CaptionedShapesDataset(hp.train_size, split="train", **common)
            self.val_set = CaptionedShapesDataset(hp.val_size, split="val", **common)
            self.test_set = CaptionedShapesDataset(hp.test_size, split="test", **common)
            if hp.random_flip:
                self.train_set = _RandomFlips(self.train_set)
            return
        order = torch.randperm(len(self._folder), generator=torch.Generator().manual_seed(hp.seed))
        n_val = max(1, round(len(order) * hp.val_fraction))
        if n_val >= len(order):
            raise ValueError(
                f"{str(self.data_dir)!r} has {len(order)} images: too few to hold out validation"
            )
        self.train_set = Subset(self._folder, order[n_val:].tolist())
        self.val_set = self.test_set = Subset(self._folder, order[:n_val].tolist())
        if hp.random_flip:
            self.train_set = _RandomFlips(self.train_set)

    def _collate(self, items: list[dict]) -> dict:
        batch = {
            "image": torch.stack([i["image"] for i in items]),
            "label": torch.tensor([i["label"] for i in items]),
            "caption": [i["caption"] for i in items],
            "index": torch.tensor([i["index"] for i in items]),
        }
        if all("original_size" in i for i in items):  # random crops: the micro-conditions
            batch["original_size"] = torch.tensor([i["original_size"] for i in items])
            batch["crop_top_left"] = torch.tensor([i["crop_top_left"] for i in items])
        return batch

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        common = {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0}
        if self.hparams.resolution_buckets:
            bucket_of = [self._folder.bucket_of[i] for i in dataset.indices]
            # a one-process DistributedSampler still receives Lightning's set_epoch calls (and its DDP swap)
            epochs = DistributedSampler(
                dataset, num_replicas=1, rank=0, shuffle=False, seed=self.hparams.seed
            )
            sampler = bucketing.BucketBatchSampler(
                epochs, bucket_of, self.batch_size, shuffle, self.hparams.seed
            )
            return ResumableDataLoader(dataset, batch_sampler=sampler, collate_fn=self._collate, **common)
        return ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle and len(dataset) > self.batch_size,
            collate_fn=self._collate,
            **common,
        )

    # ---------------------------------------------------------------- predict
    def prompts(self) -> list[dict]:
        """``{"caption", "label", "index", "name"}`` per prompt line (class name, class index or caption)."""
        if self.hparams.predict_path is None:
            lines = list(self.class_names)
            source = None
        else:
            source = Path(self.hparams.predict_path)
            if not source.is_file():
                raise FileNotFoundError(f"predict_path {str(source)!r} is not a file of prompts")
            lines = [line.strip() for line in source.read_text().splitlines()]
        items = []
        for number, line in enumerate(lines, start=1):
            if not line or line.startswith("#"):
                continue
            try:
                items.append(prompt_item(line, self.class_names, self._folder is None, len(items)))
            except ValueError as error:
                raise ValueError(f"{source}:{number}: {error}") from None
        if not items:
            raise ValueError(f"predict_path {str(source)!r} holds no prompts")
        return items

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(
            _Prompts(self.prompts()), batch_size=self.batch_size, shuffle=False, collate_fn=collate_prompts
        )

    def request_codec(self) -> PromptRequestCodec:
        """What ``zoo serve`` reads: one prompt per request, made into the item its line in ``predict_path``
        would be."""
        return PromptRequestCodec(self.class_names, shapes=self._folder is None)


def prompt_item(line: str, class_names: list[str], shapes: bool, index: int = 0) -> dict:
    """The predict item of one prompt line: ``{"caption", "label", "index", "name"}``. A class name (any case)
    or a class index gets its label, and on the embedded shapes (``shapes``) the caption the shapes use for
    the class; any other line is a caption with label -1. A class index out of range is a ``ValueError``."""
    lookup = {name.lower(): i for i, name in enumerate(class_names)}
    label = lookup.get(line.lower(), -1)
    if label < 0 and line.isdigit():
        label = int(line)
        if label >= len(class_names):
            raise ValueError(f"class index {label} >= num_classes={len(class_names)}")
        line = class_names[label]
    caption = line
    if label >= 0 and shapes:
        colour, shape = class_names[label].split()
        caption = f"a medium {colour} {shape} in the centre"
    return {"caption": caption, "label": label, "index": index, "name": line}


def collate_prompts(items: list[dict]) -> dict:
    """A predict batch: ``{"caption", "label", "index", "name"}``, plus ``"seed"`` / ``"id"`` (lists, ``None``
    where an item has none) when an item carries one (served requests do)."""
    batch = {
        "caption": [i["caption"] for i in items],
        "label": torch.tensor([i["label"] for i in items]),
        "index": torch.tensor([i["index"] for i in items]),
        "name": [i["name"] for i in items],
    }
    for key in ("seed", "id"):
        if any(key in item for item in items):
            batch[key] = [item.get(key) for item in items]
    return batch


#: The longest prompt a served model reads, in characters (the tokenizer truncates far below this; the
#: limit keeps a request from holding megabytes of text).
MAX_PROMPT_CHARACTERS = 1000
#: Seeds are what ``torch.Generator.manual_seed`` takes, kept to signed 64 bits.
MAX_SEED = 2**63 - 1


class PromptRequestCodec(RequestCodec):
    """``zoo serve`` requests for latent diffusion: ``{"prompt": ...}`` or ``{"class": ...}``, an optional
    ``seed`` and ``id``. A request becomes the predict item its prompt's line in ``predict_path`` would be, so
    the answer is that prompt's ``zoo predict`` record (``{"id", "prompt", "seed", "grid"}``, the grid as a
    base64 PNG), sampled with the request's seed, or the model's ``sampling.seed`` without one.

    Class-conditional models draw classes: ``class`` (a name or an index) is checked against the data's classes
    here, and so is a ``prompt`` once ``zoo serve`` has told the codec the model reads no free text
    (``for_model``): a caption is then refused with 422 naming the classes, instead of failing in the model.
    Caption models take any ``prompt`` (their tokenizer keeps its first ``max_length`` tokens, as in ``zoo
    predict``); ``class`` gives them the caption the data uses for the class.
    """

    fields = {
        "prompt": "what to draw: a caption, a class name or a class index (a line of predict_path)",
        "class": "instead of prompt: a class name or index",
        "seed": "optional integer >= 0 (default: the model's sampling.seed)",
        "id": "optional name, echoed in the answer",
    }
    text_fields = ("prompt", "class", "id")

    def __init__(self, class_names: list[str], shapes: bool = False, captions: bool = True) -> None:
        self.class_names = list(class_names)
        self.shapes = shapes
        self.captions = captions  # whether the model reads free text (a caption model)

    def for_model(self, model_config) -> PromptRequestCodec:
        """Class-conditional models (``ClassConditioning``, the default) read class names only."""
        conditioning = class_name(model_argument(model_config, "conditioning")) or "ClassConditioning"
        return PromptRequestCodec(self.class_names, self.shapes, captions=conditioning != "ClassConditioning")

    def parse(self, payload) -> dict:
        payload = self.check_keys(payload)
        if "class" in payload:
            if "prompt" in payload:
                raise RequestError("class", "give either 'prompt' or 'class', not both")
            line = self._class_name(payload["class"])
        elif "prompt" not in payload:
            raise RequestError("prompt", "missing: give 'prompt' (a caption or class name) or 'class'")
        else:
            line = text_field(payload, "prompt", max_length=MAX_PROMPT_CHARACTERS).strip()
            if not line:
                raise RequestError("prompt", "blank")
        try:
            item = prompt_item(line, self.class_names, self.shapes)
        except ValueError as error:
            raise RequestError("prompt", str(error)) from None
        if item["label"] < 0 and not self.captions:
            raise RequestError("prompt", f"this model is class-conditional: name one of {self._classes()}")
        seed = integer_field(payload, "seed", low=0, high=MAX_SEED)
        if seed is not None:
            item["seed"] = seed
        item_id = text_field(payload, "id", required=False, max_length=1000)
        if item_id is not None:
            item["id"] = item_id
        return item

    def collate(self, items) -> dict:
        return collate_prompts(list(items))

    def _class_name(self, value) -> str:
        names = self.class_names
        if not names:
            raise RequestError("class", "this data has no classes: give 'prompt' (a caption)")
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise RequestError("class", f"expected a class name or index, got {type(value).__name__}")
        if isinstance(value, int) or value.strip().isdigit():
            index = int(value)
            if not 0 <= index < len(names):
                raise RequestError("class", f"index {index} is outside [0, {len(names) - 1}]")
            return names[index]
        lookup = {name.lower(): name for name in names}
        if value.strip().lower() not in lookup:
            raise RequestError("class", f"unknown class {value!r}; the classes are {self._classes()}")
        return lookup[value.strip().lower()]

    def _classes(self) -> str:
        """The class names for a message, the first 12 of a long list."""
        names = self.class_names
        return ", ".join(repr(n) for n in names[:12]) + (
            f", ... ({len(names)} in all)" if len(names) > 12 else ""
        )
