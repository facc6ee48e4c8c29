"""A CSV logger that a resumed run continues, so its ``metrics.csv`` reads as if the run had never stopped.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` when its folder is reused and buffers a hundred steps of rows,
so a killed run that resumes in its own folder loses every row logged before the kill. Here rows reach the
file at every step, and a resumed run first cuts the file back to the rows logged before its checkpoint's
step (``rewind``, called by ``zoo.resume.ResumeCheckpoint``): Lightning logs a step's rows under the number of
steps taken before it, and the resumed run logs every later step again, so each row appears once, in order.
A callback that calls ``logger.log_metrics`` itself keeps to that numbering
(``trainer.fit_loop.epoch_loop._batches_that_stepped``), or its row at a checkpoint's step is cut on resume.
"""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

__all__ = ["ResumableCSVLogger"]


class _ContinuedWriter(ExperimentWriter):
    """Keeps an existing ``metrics.csv`` (and its columns) instead of deleting it."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if self._fs.isfile(self.metrics_file_path):
            self.metrics_keys = self._read()[0]

    def _check_log_dir_exists(self) -> None:
        """Lightning's deletes the file; a resumed run appends to it."""

    def _read(self) -> tuple[list[str], list[dict]]:
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            rows = list(reader)
            return list(reader.fieldnames or []), rows

    def keep_steps_before(self, step: int) -> None:
        self.save()
        if not self._fs.isfile(self.metrics_file_path):
            return
        fieldnames, rows = self._read()
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(row for row in rows if int(row["step"]) < step)


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` whose file a resumed run continues from its checkpoint's step (see the module)."""

    def __init__(self, *args, flush_logs_every_n_steps: int = 1, **kwargs) -> None:
        super().__init__(*args, flush_logs_every_n_steps=flush_logs_every_n_steps, **kwargs)

    @property
    @rank_zero_experiment
    def experiment(self) -> _ContinuedWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedWriter(log_dir=self.log_dir)
        return self._experiment

    def rewind(self, step: int) -> None:
        """Keep the rows logged before optimizer step ``step`` (a resumed run's checkpoint)."""
        self.experiment.keep_steps_before(step)
