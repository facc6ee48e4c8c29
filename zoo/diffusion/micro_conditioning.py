"""SDXL's micro-conditioning: the denoiser is told each training image's original size and crop.

Random crops teach a model cut-off objects, and discarding small images throws data away; SDXL
(Podell et al. 2023, section 2.2) instead conditions the UNet on ``(original_h, original_w, crop_top,
crop_left, target_h, target_w)`` and samples with "uncropped, full size": crop ``(0, 0)`` and the original
size equal to the target size, which gives whole, centred objects.

The values reach the UNet through diffusers' own SDXL path (``addition_embed_type="text_time"``): each
value gets sinusoidal features of width ``embed_dim`` (``addition_time_embed_dim``), the features are
concatenated and projected by an MLP (``add_embedding``) whose output is added to the time embedding. SDXL
also concatenates the pooled text embedding before that MLP; here that part is *empty* (width 0), so the
same module serves class-, caption- and unconditional models: the class label or caption keeps its usual
path (class embedding, cross-attention) and the micro-conditions are only sizes. DiT has no such input
(``LatentDiffusion`` refuses the part with it).

All values are pixels of the image the crop was taken from: ``crop_top + target_h <= original_h`` (and the
same for widths), which is what the data module's random crops record. A crop outside the image is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["MicroConditioning", "micro_time_ids"]


def _pair(value, name: str) -> tuple[int, int]:
    values = tuple(int(v) for v in value)
    if len(values) != 2:
        raise ValueError(f"{name} must be a (height, width) or (top, left) pair, got {value!r}")
    return values


def micro_time_ids(
    original_size: Sequence[int],
    crop_top_left: Sequence[int],
    target_size: Sequence[int],
    with_target: bool = True,
) -> list[int]:
    """``[orig_h, orig_w, crop_top, crop_left(, target_h, target_w)]`` (SDXL's order), checked: the crop
    must lie inside the original image."""
    (oh, ow), (top, left), (th, tw) = (
        _pair(original_size, "original_size"),
        _pair(crop_top_left, "crop_top_left"),
        _pair(target_size, "target_size"),
    )
    if min(oh, ow, th, tw) < 1 or top < 0 or left < 0 or top + th > oh or left + tw > ow:
        raise ValueError(
            f"crop_top_left=({top}, {left}) of a ({th}, {tw}) image lies outside original_size=({oh}, {ow}): "
            f"need 0 <= crop_top <= {oh - th} and 0 <= crop_left <= {ow - tw}"
        )
    return [oh, ow, top, left, th, tw] if with_target else [oh, ow, top, left]


@dataclass(frozen=True)
class MicroConditioning:
    """The micro-conditioning part of ``LatentDiffusion`` (``micro_conditioning: {embed_dim: 64}``).

    Args:
        embed_dim: sinusoidal features per value (SDXL: 256; the zoo's small UNets need far fewer).
        with_target: also condition on the target size (SDXL's base does; its refiner does not).
    """

    embed_dim: int = 64
    with_target: bool = True

    def __post_init__(self) -> None:
        if self.embed_dim < 2 or self.embed_dim % 2:
            raise ValueError(
                f"micro-conditioning embed_dim must be an even number >= 2, got {self.embed_dim}"
            )

    @property
    def num_values(self) -> int:
        return 6 if self.with_target else 4

    def unet_kwargs(self) -> dict:
        """diffusers' ``UNet2DConditionModel`` arguments of SDXL's added time embedding, without pooled text."""
        return {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": self.embed_dim,
            "projection_class_embeddings_input_dim": self.num_values * self.embed_dim,
        }

    def time_ids(
        self,
        n: int,
        target_size: Sequence[int],
        original_size: Sequence[int] | None = None,
        crop_top_left: Sequence[int] = (0, 0),
        device=None,
    ) -> torch.Tensor:
        """(n, num_values) ids of one setting for a whole batch; by default "uncropped, full size"."""
        ids = micro_time_ids(original_size or target_size, crop_top_left, target_size, self.with_target)
        return torch.tensor([ids] * n, dtype=torch.float32, device=device)

    def from_batch(self, batch: dict, target_size: Sequence[int], device=None) -> torch.Tensor:
        """The ids of a data batch: its ``original_size`` and ``crop_top_left`` (B, 2) columns, or
        "uncropped, full size" for data without them (e.g. a validation split)."""
        n = len(batch["image"])
        if "original_size" not in batch:
            return self.time_ids(n, target_size, device=device)
        target = tuple(batch["image"].shape[-2:])
        rows = [
            micro_time_ids(o, c, target, self.with_target)
            for o, c in zip(batch["original_size"].tolist(), batch["crop_top_left"].tolist())
        ]
        return torch.tensor(rows, dtype=torch.float32, device=device)
