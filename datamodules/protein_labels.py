"""Labelled proteins for fine-tuning ESM-2: per-sequence classes or values, or per-residue classes.

Sources:

- a CSV or TSV file (by suffix) with a header row: ``sequence`` and ``label`` columns, ``id``
  optional (column names configurable). Per-residue labels are a string with one class character
  per residue (e.g. ``CCHHHHEEC``);
- a FASTA file whose headers carry the label: ``>id label=membrane`` (or ``label=CCHHH...`` for
  per-residue tasks);
- nothing (the default): the embedded real proteins with a label computed from the sequence
  (``zoo.protein.properties``): Kyte-Doolittle membrane protein yes/no (sequence classification),
  GRAVY (sequence regression) or membrane-spanning residues (residue classification).

Labelled sets are small, so they are read into memory in ``__init__`` (which also gives
``num_classes`` and the class names, linked into the model by the CLI). Every problem names the file and
line. ``predict`` runs on the test split, or on every record of an unlabelled FASTA file (``predict_path``).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from zoo.base import IGNORE_INDEX
from zoo.datamodules.proteins import (
    ProteinDataset,
    ProteinLoaders,
    ProteinRequestCodec,
    embedded_fasta,
    open_usable,
    select_records,
    split_by_id,
)
from zoo.errors import MissingFileError, ZooError
from zoo.protein.alphabet import Alphabet
from zoo.protein.fasta import ALLOWED, FastaIndex, clean_sequence, id_hash, invalid_residue
from zoo.protein.properties import gravy, is_membrane_protein, transmembrane_residues

__all__ = ["TASKS", "LabeledProteinDataset", "ProteinLabelDataModule", "read_labeled_proteins"]

TASKS = ("sequence-classification", "sequence-regression", "residue-classification")
#: the class names of the labels derived for the embedded proteins, per task
DERIVED_CLASSES = {
    "sequence-classification": ["soluble", "membrane"],
    "residue-classification": ["0", "1"],  # 1 = inside a Kyte-Doolittle membrane-spanning window
}


def _sequence(text: str, where: str) -> str:
    residues = clean_sequence(text.encode("utf-8", errors="replace"))
    if not residues:
        raise ZooError(f"{where}: empty sequence")
    bad = invalid_residue(residues)
    if bad is not None:
        raise ZooError(
            f"{where}: {chr(residues[bad])!r} at residue {bad + 1} is outside the ESM alphabet ({ALLOWED.decode()})"
        )
    return residues.decode("ascii")


def _read_table(
    path: Path, sequence_column: str, label_column: str, id_column: str
) -> list[tuple[str, str, str, str]]:
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    rows = []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        columns = reader.fieldnames or []
        missing = [c for c in (sequence_column, label_column) if c not in columns]
        if missing:
            raise ZooError(f"{path}:1: missing column(s) {missing}; the header has {columns}")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            record_id = row.get(id_column) or f"row{reader.line_num}"
            label = (row.get(label_column) or "").strip()
            if not label:
                raise ZooError(f"{where}: empty {label_column!r}")
            rows.append((record_id, row.get(sequence_column) or "", label, where))
    return rows


def _read_fasta_labels(path: Path) -> list[tuple[str, str, str, str]]:
    index = FastaIndex.open(path)
    select_records(index, "error", 1.0)  # raises on the first bad record
    rows = []
    for i in range(len(index)):
        where = f"{path}:{index.line_of(int(index.header_start[i]))}"
        fields = dict(f.split("=", 1) for f in index.header(i).split()[1:] if "=" in f)
        if "label" not in fields:
            raise ZooError(f"{where}: header has no 'label=...' field")
        rows.append((index.record_id(i), index.sequence(i), fields["label"], where))
    return rows


def read_labeled_proteins(
    path: str | Path,
    task: str,
    sequence_column: str = "sequence",
    label_column: str = "label",
    id_column: str = "id",
) -> list[tuple[str, str, str, str]]:
    """``(id, sequence, raw label, "file:line")`` rows of a CSV/TSV or FASTA-with-labels file, validated."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"labelled protein file {str(path)!r} does not exist")
    if path.suffix.lower() in (".csv", ".tsv", ".tab"):
        raw = _read_table(path, sequence_column, label_column, id_column)
    else:
        raw = _read_fasta_labels(path)
    rows, seen = [], {}
    for record_id, text, label, where in raw:
        if record_id in seen:
            raise ZooError(f"{where}: duplicate id {record_id!r} (first at {seen[record_id]})")
        seen[record_id] = where
        sequence = _sequence(text, where)
        if task == "residue-classification" and len(label) != len(sequence):
            raise ZooError(
                f"{where}: {len(label)} residue labels for {len(sequence)} residues in {record_id!r}"
            )
        rows.append((record_id, sequence, label, where))
    if not rows:
        raise ZooError(f"{path}: no labelled proteins found")
    return rows


def _derived_rows(task: str) -> list[tuple[str, str, str, str]]:
    """The embedded proteins, labelled by ``zoo.protein.properties``."""
    index = FastaIndex.open(embedded_fasta())
    usable, _ = select_records(index, "error", 0.5)
    rows = []
    for i in usable:
        record_id, sequence = index.record_id(int(i)), index.sequence(int(i))
        if task == "sequence-classification":
            label = "membrane" if is_membrane_protein(sequence) else "soluble"
        elif task == "sequence-regression":
            label = repr(gravy(sequence))
        else:
            label = "".join("1" if tm else "0" for tm in transmembrane_residues(sequence))
        rows.append((record_id, sequence, label, f"{embedded_fasta()}:{record_id}"))
    return rows


class LabeledProteinDataset(Dataset):
    """``{"id", "sequence", "label"}``; a cropped sequence keeps the matching residue labels."""

    def __init__(self, ids, sequences, labels, max_length: int, crop: bool, per_residue: bool) -> None:
        self.ids, self.sequences, self.labels = ids, sequences, labels
        self.max_length, self.crop, self.per_residue = max_length, crop, per_residue

    def __len__(self) -> int:
        return len(self.ids)

    def token_lengths(self) -> np.ndarray:
        return np.minimum([len(s) for s in self.sequences], self.max_length) + 2

    def __getitem__(self, item: int) -> dict:
        sequence, label = self.sequences[item], self.labels[item]
        if len(sequence) > self.max_length:
            start = int(torch.randint(0, len(sequence) - self.max_length + 1, (1,))) if self.crop else 0
            sequence = sequence[start : start + self.max_length]
            if self.per_residue:
                label = label[start : start + self.max_length]
        return {"id": self.ids[item], "sequence": sequence, "label": label}


class LabeledProteinCollate:
    """Adds ``labels``: (B,) int64 classes or float32 values, or (B, T) int64 with -100 off-residue; examples
    without a label (prediction inputs) give ``{"tokens", "ids"}`` alone."""

    def __init__(self, alphabet: Alphabet, task: str) -> None:
        self.converter = alphabet.get_batch_converter()
        self.task = task

    def __call__(self, examples: list[dict]) -> dict:
        ids, _, tokens = self.converter([(e["id"], e["sequence"]) for e in examples])
        if "label" not in examples[0]:
            return {"tokens": tokens, "ids": ids}
        if self.task == "residue-classification":
            labels = torch.full(tokens.shape, IGNORE_INDEX, dtype=torch.int64)
            for row, example in enumerate(examples):
                labels[row, 1 : len(example["label"]) + 1] = torch.as_tensor(example["label"])
        elif self.task == "sequence-regression":
            labels = torch.tensor([e["label"] for e in examples], dtype=torch.float32)
        else:
            labels = torch.tensor([e["label"] for e in examples], dtype=torch.int64)
        return {"tokens": tokens, "ids": ids, "labels": labels}


class ProteinLabelDataModule(ProteinLoaders):
    """Labelled proteins for ``ESM2SequencePredictor`` / ``ESM2ResiduePredictor``, split by id and seed.

    Args:
        file: a CSV/TSV or FASTA-with-labels file; ``None`` uses the embedded proteins with a label
            derived for ``task`` (see the module docstring).
        task: ``sequence-classification``, ``sequence-regression`` or ``residue-classification``.
        classes: class names in label order; by default the sorted distinct labels (characters for
            per-residue labels). A label outside a given list is an error naming its line.
        batch_size / max_tokens / max_length / val_fraction / test_fraction / seed: as
            ``ProteinDataModule``.
        predict_path: an unlabelled FASTA file whose every record ``predict`` runs on (cut to
            ``max_length``); by default ``predict`` runs on the test split.
    """

    #: data attribute -> model argument, fed by ``zoo fit`` into models that take the argument
    model_links: ClassVar[dict[str, str]] = {"num_classes": "num_classes", "classes": "class_names"}

    def __init__(
        self,
        file: str | None = None,
        task: Literal["sequence-classification", "sequence-regression", "residue-classification"] = (
            "sequence-classification"
        ),
        sequence_column: str = "sequence",
        label_column: str = "label",
        id_column: str = "id",
        classes: list[str] | None = None,
        batch_size: int = 32,
        max_tokens: int | None = None,
        max_length: int = 1022,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        predict_path: str | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if task not in TASKS:
            raise ZooError(f"task must be one of {TASKS}, got {task!r}")
        if max_tokens is not None and max_tokens < max_length + 2:
            raise ZooError(f"max_tokens={max_tokens} must be >= max_length + 2 = {max_length + 2}")
        if predict_path is not None and not Path(predict_path).is_file():
            raise MissingFileError(f"FASTA file {predict_path!r} does not exist")
        self.task = task
        self.predict_set: ProteinDataset | None = None
        if file is None:
            rows = _derived_rows(task)
            classes = classes or DERIVED_CLASSES.get(task)
        else:
            rows = read_labeled_proteins(file, task, sequence_column, label_column, id_column)
        self.ids = [r[0] for r in rows]
        self.sequences = [r[1] for r in rows]
        self.classes, self.labels = self._encode_labels(rows, classes)
        self.num_classes = len(self.classes) if self.classes else 1
        self.alphabet = Alphabet()
        self.collate = LabeledProteinCollate(self.alphabet, task)

    def _encode_labels(self, rows, classes: list[str] | None) -> tuple[list[str], list]:
        if self.task == "sequence-regression":
            labels = []
            for _, _, label, where in rows:
                try:
                    labels.append(float(label))
                except ValueError:
                    raise ZooError(f"{where}: label {label!r} is not a number (task is regression)") from None
            return [], labels
        per_residue = self.task == "residue-classification"
        if classes is None:
            classes = sorted({c for r in rows for c in r[2]} if per_residue else {r[2] for r in rows})
        lookup = {name: i for i, name in enumerate(classes)}
        labels = []
        for _, _, label, where in rows:
            unknown = [c for c in (label if per_residue else [label]) if c not in lookup]
            if unknown:
                raise ZooError(f"{where}: label {unknown[0]!r} is not one of the classes {classes}")
            labels.append([lookup[c] for c in label] if per_residue else lookup[label])
        return list(classes), labels

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if stage == "predict" and hp.predict_path is not None:
            if self.predict_set is None:
                index, usable, _ = open_usable(Path(hp.predict_path), None, "error", 1.0)
                self.predict_set = ProteinDataset(index, usable, hp.max_length, crop=False)
            return
        if self.train_set is not None:
            return
        hashes = np.asarray([id_hash(i.encode()) for i in self.ids], dtype=np.uint64)
        splits = split_by_id(hashes, np.arange(len(self.ids)), hp.seed, hp.val_fraction, hp.test_fraction)
        per_residue = self.task == "residue-classification"

        def subset(indices: np.ndarray, crop: bool) -> LabeledProteinDataset:
            pick = indices.tolist()
            return LabeledProteinDataset(
                [self.ids[i] for i in pick],
                [self.sequences[i] for i in pick],
                [self.labels[i] for i in pick],
                hp.max_length,
                crop,
                per_residue,
            )

        self.train_set = subset(splits[0], crop=True)
        self.val_set = subset(splits[1], crop=False)
        self.test_set = subset(splits[2], crop=False) if len(splits[2]) else self.val_set

    def request_codec(self) -> ProteinRequestCodec:
        """What ``zoo serve`` reads: one sequence per request (no label), as ``ProteinDataModule``'s."""
        return ProteinRequestCodec(self.alphabet, self.hparams.max_length)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(
            self.predict_set if self.predict_set is not None else self.test_set, shuffle=False
        )
