"""Random crops of the embedded shapes at mixed original sizes, for SDXL-style micro-conditioning.

Each training item draws a scale ``s`` from ``scales``, renders its scene at ``round(img_size * s)`` pixels
(the same scene, a pure function of its index, only larger: its *original size*) and cuts an ``img_size``
square at a random ``(top, left)``. A scale of 1 is the uncropped image, crop ``(0, 0)``. Larger scales show
part of the scene, often with the shape off-centre or cut by the border: what a model trained on random
crops learns to draw, unless it is told the crop (``zoo.diffusion.micro_conditioning``). Items carry
``original_size`` and ``crop_top_left`` as ``(h, w)`` / ``(top, left)`` pixel pairs. The draws come from
torch's global generator, which the zoo's loader seeds per ``(seed, epoch, index)``: each epoch crops anew,
and a resumed run crops as the killed one would have.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from zoo.datamodules.shapes import render_shapes

__all__ = ["RandomCropShapes"]


class RandomCropShapes(Dataset):
    """A split of the shapes, each item an ``img_size`` crop of its scene rendered at a random scale."""

    def __init__(
        self,
        size: int,
        *,
        split: str,
        seed: int,
        img_size: int,
        scales: list[float],
        noise: float = 0.0,
    ) -> None:
        if not scales or min(scales) < 1.0:
            raise ValueError(
                f"crop_scales must be scales >= 1 of the image size (1 = uncropped), got {scales}"
            )
        self.size, self.img_size, self.scales = size, img_size, [float(s) for s in scales]
        self._args = {"seed": seed, "split": split, "noise": noise}
        self._cache: dict[tuple[int, int], object] = {}

    def __len__(self) -> int:
        return self.size

    def _scene(self, index: int, side: int):
        key = (index, side)
        if key not in self._cache:  # uint8, 3 to 12 kB a scene
            self._cache[key] = render_shapes(index, image_size=side, **self._args)
        return self._cache[key]

    def __getitem__(self, index: int) -> dict:
        scale = self.scales[int(torch.randint(len(self.scales), ()))]
        side = max(self.img_size, round(self.img_size * scale))
        top, left = (int(v) for v in torch.randint(0, side - self.img_size + 1, (2,)))
        scene = self._scene(index, side)
        pixels = torch.from_numpy(scene.image[top : top + self.img_size, left : left + self.img_size])
        return {
            "image": pixels.permute(2, 0, 1).float().div(127.5).sub(1.0),
            # the scene's label and caption (the same at every size); a crop may cut the shape, and the
            # caption's position words describe the uncropped scene
            "label": scene.label,
            "caption": scene.caption,
            "index": index,
            "original_size": (side, side),
            "crop_top_left": (top, left),
        }
