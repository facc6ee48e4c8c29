"""A CSV logger that a resumed run continues, so its ``metrics.csv`` reads as if the run had never stopped.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` when its folder is reused and buffers rows until a flush, so
a killed run that resumes in its own folder loses every row logged before the kill. Here the rows written
when a checkpoint was saved are counted (``position``, stored by ``zoo.resume.ResumeCheckpoint``), and the
resumed run cuts the file back to that count (``rewind``) before it logs again: the rows a kill lost or that
the resumed run logs a second time appear once, in order.
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

    def rows_written(self) -> int:
        self.save()
        return len(self._read()[1]) if self._fs.isfile(self.metrics_file_path) else 0

    def keep_rows(self, count: int) -> None:
        self.metrics = []
        if not self._fs.isfile(self.metrics_file_path):
            return
        fieldnames, rows = self._read()
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows[:count])


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` whose file a resumed run continues from the checkpoint's row (see the module)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _ContinuedWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedWriter(log_dir=self.log_dir)
        return self._experiment

    def position(self) -> int:
        """Rows on disk after flushing what is buffered (called as a checkpoint is saved)."""
        return self.experiment.rows_written()

    def rewind(self, rows: int) -> None:
        """Cut ``metrics.csv`` back to its first ``rows`` rows (what was logged when the checkpoint was saved)."""
        self.experiment.keep_rows(rows)
