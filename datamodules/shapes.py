"""The embedded "shapes" image set: labelled, captioned images drawn from a seed, nothing downloaded.

Each image shows one coloured shape (class = shape x colour) at a random position, scale and
rotation, over a random background with grey clutter strokes and pixel noise. Image ``i`` of a
split depends only on ``(seed, split, i)``, so any subset can be drawn in any order and the
data are identical on every machine and every rank. Shapes are drawn at 4x resolution and
downsampled, so edges are anti-aliased like photographs rather than jagged.

The same images serve the vision classifiers (label), the diffusion models (caption) and the
distillation callbacks (a teacher and student on the same data).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from zoo.errors import ZooError

__all__ = ["COLOURS", "NOVEL_COLOURS", "SHAPES", "SPLITS", "ShapesDataset", "render_shapes"]

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230)}
#: Colours no split of the shapes uses: a shape in one of them is a concept a model trained on the shapes has
#: never seen (the embedded "instance" of DreamBooth and textual inversion, ``zoo.datamodules.instance_images``).
NOVEL_COLOURS = {"yellow": (230, 200, 40)}
SPLITS = {"train": 0, "val": 1, "test": 2, "instance": 3}
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeSample:
    image: np.ndarray  # (H, W, 3) uint8
    label: int
    caption: str


def _polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners = [(math.pi / 4 + k * math.pi / 2) for k in range(4)]
        pts = [(radius * math.cos(a), radius * math.sin(a)) for a in corners]
    elif shape == "triangle":
        pts = [
            (radius * math.cos(a), radius * math.sin(a))
            for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))
        ]
    elif shape == "cross":
        w = radius * 0.38
        pts = [(-w, -radius), (w, -radius), (w, -w), (radius, -w), (radius, w), (w, w),
               (w, radius), (-w, radius), (-w, w), (-radius, w), (-radius, -w), (-w, -w)]  # fmt: skip
    else:
        raise ZooError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in pts]


def _position_words(cx: float, cy: float, size: int) -> str:
    row = ("top", "middle", "bottom")[min(int(3 * cy / size), 2)]
    col = ("left", "centre", "right")[min(int(3 * cx / size), 2)]
    return "centre" if row == "middle" and col == "centre" else f"{row} {col}"


def render_shapes(
    index: int,
    *,
    seed: int,
    split: str,
    image_size: int,
    shapes: tuple[str, ...] = SHAPES,
    colours: tuple[str, ...] = tuple(COLOURS),
    clutter: int = 2,
    noise: float = 0.04,
) -> ShapeSample:
    """Draw image ``index`` of ``split``: a pure function of its arguments."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    shape_id = int(rng.integers(len(shapes)))
    colour_id = int(rng.integers(len(colours)))
    big = image_size * _SUPERSAMPLE

    background = tuple(int(v) for v in rng.integers(90, 170, size=3))
    canvas = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(canvas)
    for _ in range(clutter):
        grey = int(rng.integers(40, 220))
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, big, size=4))
        draw.line((x0, y0, x1, y1), fill=(grey, grey, grey), width=int(rng.integers(1, 3)) * _SUPERSAMPLE)

    scale = float(rng.uniform(0.26, 0.40))
    radius = scale * big
    margin = radius * 0.9
    cx, cy = (float(v) for v in rng.uniform(margin, big - margin, size=2))
    base = np.array({**COLOURS, **NOVEL_COLOURS}[colours[colour_id]], dtype=np.float64)
    fill = tuple(int(v) for v in np.clip(base + rng.normal(0, 18, size=3), 0, 255))
    shape = shapes[shape_id]
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, radius, float(rng.uniform(0, 2 * math.pi))), fill=fill)

    small = canvas.resize((image_size, image_size), Image.Resampling.LANCZOS)
    pixels = np.asarray(small, dtype=np.float32)
    pixels += rng.normal(0, noise * 255, size=pixels.shape)
    image = np.clip(pixels, 0, 255).astype(np.uint8)

    size_word = "small" if scale < 0.31 else ("large" if scale > 0.35 else "medium")
    where = _position_words(cx, cy, big)
    caption = f"a {size_word} {colours[colour_id]} {shape} in the {where}"
    return ShapeSample(image=image, label=shape_id * len(colours) + colour_id, caption=caption)


class ShapesDataset(Dataset):
    """A split of the shapes set. Each image is rendered on first access and cached (3 kB at 32 px).

    Items are dicts ``{"image": float tensor (3, H, W) in [0, 1], "label": int, "caption": str}``.
    """

    def __init__(
        self,
        size: int,
        *,
        split: str = "train",
        seed: int = 0,
        img_size: int = 32,
        shapes: tuple[str, ...] = SHAPES,
        colours: tuple[str, ...] = tuple(COLOURS),
        transform=None,
    ) -> None:
        if split not in SPLITS:
            raise ZooError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        if size < 1:
            raise ZooError(f"a shapes split needs at least one image, got size={size}")
        unknown = [c for c in colours if c not in COLOURS]
        if unknown:
            raise ZooError(f"unknown colours {unknown}; expected names from {tuple(COLOURS)}")
        self.shapes, self.colours = tuple(shapes), tuple(colours)
        self.class_names = [f"{c} {s}" for s in self.shapes for c in self.colours]
        self.transform = transform
        self._render_args = {"seed": seed, "split": split, "image_size": img_size, "shapes": self.shapes}
        self._render_args["colours"] = self.colours
        self._cache: list[ShapeSample | None] = [None] * size

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self._cache)

    def sample(self, index: int) -> ShapeSample:
        """The rendered image (uint8, H x W x 3), label and caption of item ``index``."""
        cached = self._cache[index]
        if cached is None:
            cached = self._cache[index] = render_shapes(index, **self._render_args)
        return cached

    def __getitem__(self, index: int) -> dict:
        sample = self.sample(index)
        image = torch.from_numpy(sample.image).permute(2, 0, 1).float().div_(255)
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "label": sample.label, "caption": sample.caption}
