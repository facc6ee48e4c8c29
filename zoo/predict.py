"""The predict contract: one serialisable record per input, written once for every family.

A zoo module's ``predict_step`` returns ``list[dict]``, one record per input, each with an ``"id"`` (a file
name, FASTA id, prompt, sample token). ``RecordPredictionWriter`` (added by ``zoo predict`` when a config
names no prediction writer) writes them under the run folder:

- ``predictions.jsonl``: one JSON object per record with its plain values (numbers, strings, lists, dicts);
- ``tensors.pt`` (or ``.npz`` / ``.safetensors``): every tensor value as ``{field: {id: tensor}}``, which
  ``load_predictions`` reads back; the JSON line holds ``{"tensor": field, "shape": [...]}`` in its place;
- ``<id>_<field>.png``: every ``PIL.Image`` value (a sample grid, a top-down view); the JSON line holds the
  file name.

Files are written under temporary names and renamed, so a crash never leaves half a file. Under several
processes each rank writes its own ``<name>.rank<k><suffix>`` files (Lightning may repeat a few records to
even out ranks: same id, same values).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

__all__ = ["RecordPredictionWriter", "load_predictions", "load_records"]

TENSOR_FORMATS = ("pt", "npz", "safetensors")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class RecordPredictionWriter(BasePredictionWriter):
    """Writes the records ``predict_step`` returns (see the module docstring for the files).

    Args:
        output_dir: folder for the files; relative paths are under the run's log folder
            (``runs/lightning_logs/version_N/``), or under ``default_root_dir`` without a logger.
        tensor_format: ``pt`` (``torch.load(..., weights_only=True)``), ``npz`` or ``safetensors``.
    """

    def __init__(self, output_dir: str = "predictions", tensor_format: str = "pt") -> None:
        super().__init__(write_interval="batch")
        if tensor_format not in TENSOR_FORMATS:
            raise ValueError(f"tensor_format must be one of {TENSOR_FORMATS}, got {tensor_format!r}")
        self.output_dir = output_dir
        self.tensor_format = tensor_format
        self.folder: Path | None = None
        self.records: list[dict[str, Any]] = []
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}
        self.images_written = 0

    # ------------------------------------------------------------------ paths
    def _resolve_folder(self, trainer) -> Path:
        folder = Path(self.output_dir)
        if not folder.is_absolute():
            base = trainer.log_dir if trainer.logger is not None else None
            folder = Path(base or trainer.default_root_dir) / folder
        return folder

    def _rank_name(self, trainer, name: str) -> str:
        if trainer.world_size == 1:
            return name
        stem, dot, suffix = name.partition(".")
        return f"{stem}.rank{trainer.global_rank}{dot}{suffix}"

    # ------------------------------------------------------------------ hooks
    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self.folder = self._resolve_folder(trainer)  # a collective under DDP: every rank asks
        self.records, self.tensors, self.images_written = [], {}, 0

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        if not isinstance(prediction, Sequence) or not all(isinstance(r, Mapping) for r in prediction):
            raise TypeError(
                f"{type(pl_module).__name__}.predict_step must return a list of records (one dict per input) "
                f"for RecordPredictionWriter, got {type(prediction).__name__}"
            )
        for record in prediction:
            if "id" not in record:
                raise ValueError(f"a prediction record has no 'id' (fields: {sorted(record)})")
            self.records.append(self._plain(str(record["id"]), record))

    def _plain(self, record_id: str, record: Mapping[str, Any]) -> dict[str, Any]:
        """The record with tensors moved to ``self.tensors`` and images saved as PNG files."""
        out: dict[str, Any] = {}
        for field, value in record.items():
            out[field] = self._plain_value(record_id, field, value)
        return out

    def _plain_value(self, record_id: str, field: str, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if value.dim() == 0:
                return value.item()
            self.tensors.setdefault(field, {})[record_id] = value.detach().cpu().clone()
            return {"tensor": field, "shape": list(value.shape)}
        if _is_image(value):
            assert self.folder is not None
            name = f"{_safe(record_id)}_{_safe(field)}.png"
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f".{name}.tmp"
            value.save(tmp, format="PNG")
            os.replace(tmp, self.folder / name)
            self.images_written += 1
            return name
        if isinstance(value, Mapping):
            return {str(k): self._plain_value(record_id, f"{field}.{k}", v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._plain_value(record_id, f"{field}.{i}", v) for i, v in enumerate(value)]
        if isinstance(value, np.generic):
            return value.item()
        return value

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        assert self.folder is not None
        self.folder.mkdir(parents=True, exist_ok=True)
        jsonl = self.folder / self._rank_name(trainer, "predictions.jsonl")
        _atomic_write_text(jsonl, "".join(json.dumps(r) + "\n" for r in self.records))
        written = [jsonl.name]
        if self.tensors:
            tensors = self.folder / self._rank_name(trainer, f"tensors.{self.tensor_format}")
            _write_tensors(tensors, self.tensors)
            written.append(tensors.name)
        extra = f" and {self.images_written} PNG files" if self.images_written else ""
        if trainer.is_global_zero:
            summary = f"{len(self.records)} records: {', '.join(written)}{extra}"
            print(f"\nzoo: predictions written to {self.folder} ({summary})", flush=True)


def _is_image(value: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        return False
    return isinstance(value, Image.Image)


def _safe(name: str) -> str:
    """A file-name-safe form of a record id or field (``A/b c.png`` -> ``A_b_c.png``)."""
    return _UNSAFE.sub("_", name).strip("_")[:120] or "record"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_tensors(path: Path, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    flat = {f"{field}/{rid}": value for field, values in tensors.items() for rid, value in values.items()}
    if path.suffix == ".pt":
        torch.save(tensors, tmp)
    elif path.suffix == ".npz":
        np.savez(tmp, **{key: value.numpy() for key, value in flat.items()})
    else:
        from safetensors.torch import save_file

        save_file({key: value.contiguous() for key, value in flat.items()}, str(tmp))
    os.replace(tmp, path)


def load_predictions(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """Read a tensors file written by ``RecordPredictionWriter`` back as ``{field: {id: tensor}}``."""
    path = Path(path)
    if path.suffix == ".pt":
        return torch.load(path, map_location="cpu", weights_only=True)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            flat = {key: torch.from_numpy(archive[key]) for key in archive.files}
    else:
        from safetensors.torch import load_file

        flat = load_file(str(path))
    nested: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        field, record_id = key.split("/", 1)
        nested.setdefault(field, {})[record_id] = value
    return nested


def load_records(folder: str | Path) -> list[dict[str, Any]]:
    """The records of a predictions folder, in order (``predictions.jsonl``; rank files concatenated)."""
    folder = Path(folder)
    files = sorted(folder.glob("predictions*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no predictions*.jsonl in {folder}")
    return [json.loads(line) for file in files for line in file.read_text().splitlines() if line]
