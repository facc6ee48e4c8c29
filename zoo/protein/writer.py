"""Write ``zoo predict`` outputs to one file keyed by FASTA record id.

A protein module's ``predict_step`` returns ``{"ids": [...], <name>: per-record values}`` where a
value is a tensor whose first dimension is the batch or a list with one tensor per record (contact
maps differ in size). ``RecordPredictionWriter`` collects them and writes, at the end of predict:

- ``.pt``: ``{<name>: {id: tensor}}`` (``torch.load(path, weights_only=True)`` reads it);
- ``.npz``: arrays named ``<name>/<id>``;
- ``.safetensors``: tensors named ``<name>/<id>`` (needs the ``safetensors`` package).

The file is written under a temporary name and renamed, so a crash never leaves half a file. Under
several processes each rank writes its own ``<stem>.rank<k><suffix>`` (the records are disjoint,
except Lightning may repeat a few to even out ranks: same id, same values).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["RecordPredictionWriter", "load_predictions"]

SUFFIXES = (".pt", ".npz", ".safetensors")


class RecordPredictionWriter(BasePredictionWriter):
    """Collects per-record predictions during ``predict`` and writes them keyed by record id.

    Args:
        output: file to write; relative paths are under the trainer's ``default_root_dir``.
    """

    def __init__(self, output: str = "predictions/esm2.pt") -> None:
        super().__init__(write_interval="batch")
        if Path(output).suffix not in SUFFIXES:
            raise ValueError(f"output {output!r} must end in one of {SUFFIXES}")
        self.output = output
        self.collected: dict[str, dict[str, torch.Tensor]] = {}
        self.written: Path | None = None

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self.collected = {}

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ):
        if not isinstance(prediction, dict) or "ids" not in prediction:
            raise TypeError("predict_step must return a dict with 'ids' and per-record values to be written")
        ids = list(prediction["ids"])
        for name, values in prediction.items():
            if name == "ids" or values is None:
                continue
            if len(values) != len(ids):
                raise ValueError(f"prediction {name!r} has {len(values)} entries for {len(ids)} ids")
            store = self.collected.setdefault(name, {})
            for record_id, value in zip(ids, values):
                store[record_id] = value.detach().float().cpu().clone()

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        path = Path(self.output)
        if not path.is_absolute():
            path = Path(trainer.default_root_dir) / path
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        _write(path, self.collected)
        self.written = path
        counts = ", ".join(f"{len(v)} {k}" for k, v in self.collected.items())
        rank_zero_info(f"zoo: predictions written to {path} ({counts})")


def _write(path: Path, collected: dict[str, dict[str, torch.Tensor]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    flat = {f"{name}/{rid}": value for name, values in collected.items() for rid, value in values.items()}
    if path.suffix == ".pt":
        torch.save(collected, tmp)
    elif path.suffix == ".npz":
        np.savez(tmp, **{key: value.numpy() for key, value in flat.items()})
    else:
        from safetensors.torch import save_file

        save_file({key: value.contiguous() for key, value in flat.items()}, str(tmp))
    os.replace(tmp, path)


def load_predictions(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """Read a file written by ``RecordPredictionWriter`` back as ``{name: {id: tensor}}``."""
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
        name, record_id = key.split("/", 1)
        nested.setdefault(name, {})[record_id] = value
    return nested
