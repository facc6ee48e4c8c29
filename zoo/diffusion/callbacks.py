"""``SampleGridLogger``: what a diffusion model draws, during training.

After validation, it samples with the conditions of the first validation batch (fixed seed, so grids are
comparable across epochs), logs the grid to loggers that take images and writes it as
``<log_dir>/samples/epoch=N.png``, so it is visible even with the CSV logger. (``zoo predict`` writes the
grids of a prompts file: ``LatentDiffusion.predict_step`` returns one record per prompt.)
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer

from zoo.diffusion.images import log_image_grid, make_grid, save_png, to_unit_range

__all__ = ["SampleGridLogger"]


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
