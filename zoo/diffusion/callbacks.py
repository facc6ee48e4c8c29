"""Callbacks of the diffusion family: sample grids during validation, PNG grids from ``zoo predict``.

- ``SampleGridLogger``: after validation, samples with the conditions of the first validation batch
  (fixed seed, so grids are comparable across epochs), logs the grid to loggers that take images and
  writes it as ``<log_dir>/samples/epoch=N.png``, so it is visible even with the CSV logger.
- ``SampleGridWriter``: a ``BasePredictionWriter`` for ``zoo predict``; one PNG grid per prompt
  (``<index>_<prompt>.png``, a row of ``samples_per_prompt`` images) and one ``all.png`` with a row per
  prompt, under ``output_dir`` (default ``<trainer.default_root_dir>/samples``).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from zoo.diffusion.images import log_image_grid, make_grid, save_png, to_unit_range

__all__ = ["SampleGridLogger", "SampleGridWriter"]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60] or "prompt"


class SampleGridLogger(Callback):
    """Sample ``num_samples`` images after every ``every_n_epochs``-th validation and log/save the grid."""

    def __init__(self, num_samples: int = 12, every_n_epochs: int = 1, save_png: bool = True) -> None:
        self.num_samples = num_samples
        self.every_n_epochs = every_n_epochs
        self.save_png = save_png
        self._batch: dict | None = None

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if batch_idx == 0 and dataloader_idx == 0:
            self._batch = {
                k: (v[: self.num_samples] if hasattr(v, "__getitem__") else v) for k, v in batch.items()
            }

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if (
            self._batch is None
            or trainer.sanity_checking
            or (trainer.current_epoch + 1) % self.every_n_epochs
        ):
            return
        images = pl_module.samples_for_batch(self._batch, self.num_samples)
        if not trainer.is_global_zero:
            return
        grid = make_grid(to_unit_range(images), nrow=min(len(images), 6))
        log_image_grid(trainer.logger, "val/samples", grid, trainer.global_step)
        if self.save_png and trainer.log_dir:
            save_png(grid, Path(trainer.log_dir) / "samples" / f"epoch={trainer.current_epoch}.png")


class SampleGridWriter(BasePredictionWriter):
    """Write each prompt's samples (``LatentDiffusion.predict_step`` output) as PNG grids under ``output_dir``."""

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = Path(output_dir) if output_dir else None

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        out = self.output_dir or Path(trainer.default_root_dir) / "samples"
        rows = []
        for output in predictions:
            for images, name, index in zip(output["images"], output["name"], output["index"]):
                row = to_unit_range(images)
                save_png(make_grid(row, nrow=len(row)), out / f"{int(index):03d}_{_slug(name)}.png")
                rows.append(row)
        if rows:
            everything = torch.cat(rows)
            save_png(make_grid(everything, nrow=len(rows[0])), out / "all.png")
            print(f"zoo: {len(rows)} sample grids written to {out}", flush=True)
