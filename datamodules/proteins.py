"""Protein sequences for ESM-2: an embedded synthetic set by default, a FASTA file otherwise.

The embedded set is generated from a seed (no download, identical on every machine): sequences
from a sparse first-order Markov chain over the 20 amino acids, so a masked residue is partly
predictable from its neighbours and masked-LM perplexity has room to fall well below the
~20 of uniform guessing. It is a smoke-test and training-loop check, not biology.

A FASTA file is parsed and validated at ``setup``: a file that is not FASTA, an empty record,
a duplicate id or a character outside the ESM alphabet is reported with the file, the line
and what was expected. A trailing ``*`` (stop) is dropped and lowercase is upper-cased.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from zoo.datamodules.splits import SplitDataModule
from zoo.protein.alphabet import AMINO_ACIDS, Alphabet

__all__ = ["ProteinDataModule", "ProteinRecord", "read_fasta", "synthetic_proteins"]


@dataclass(frozen=True)
class ProteinRecord:
    id: str
    sequence: str


def read_fasta(path: str | Path, alphabet: Alphabet | None = None) -> list[ProteinRecord]:
    """Parse and validate a FASTA file; every problem names the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FASTA file {str(path)!r} does not exist")
    alphabet = alphabet or Alphabet()
    allowed = set("".join(t for t in alphabet.all_toks if len(t) == 1))
    records: list[ProteinRecord] = []
    seen: dict[str, int] = {}
    header: tuple[str, int] | None = None
    chunks: list[str] = []

    def finish() -> None:
        if header is None:
            return
        name, line_no = header
        sequence = "".join(chunks).rstrip("*")
        if not sequence:
            raise ValueError(f"{path}:{line_no}: record {name!r} has an empty sequence")
        records.append(ProteinRecord(name, sequence))

    with path.open("r", encoding="utf-8", errors="strict") as handle:
        try:
            lines = list(handle)
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: not a text FASTA file ({error})") from error
    for line_no, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith(">"):
            finish()
            name = line[1:].split(maxsplit=1)[0] if line[1:].strip() else ""
            if not name:
                raise ValueError(f"{path}:{line_no}: header without an id (expected '>id description')")
            if name in seen:
                raise ValueError(f"{path}:{line_no}: duplicate id {name!r} (first seen on line {seen[name]})")
            seen[name] = line_no
            header, chunks = (name, line_no), []
            continue
        if header is None:
            raise ValueError(f"{path}:{line_no}: not a FASTA file (expected a '>' header line first)")
        residues = line.upper()
        body = residues.rstrip("*")
        bad = next((i for i, c in enumerate(body) if c not in allowed), None)
        if bad is not None:
            raise ValueError(
                f"{path}:{line_no}: record {header[0]!r} has {body[bad]!r} at column {bad + 1}, "
                f"outside the ESM alphabet ({''.join(sorted(allowed))})"
            )
        chunks.append(residues)
    finish()
    if not records:
        raise ValueError(f"{path}: no FASTA records found (expected '>id' header lines)")
    return records


def synthetic_proteins(count: int, min_length: int, max_length: int, seed: int) -> list[ProteinRecord]:
    """Deterministic Markov-chain proteins: each residue has a few likely successors."""
    generator = torch.Generator().manual_seed(seed)
    n = len(AMINO_ACIDS)
    logits = torch.randn(n, n, generator=generator) * 3.0  # peaked rows: low-entropy transitions
    transitions = logits.softmax(-1)
    lengths = torch.randint(min_length, max_length + 1, (count,), generator=generator)
    state = torch.randint(0, n, (count,), generator=generator)
    columns = [state]
    for _ in range(max_length - 1):  # all sequences step together: max_length draws, not sum(lengths)
        state = torch.multinomial(transitions[state], 1, generator=generator).squeeze(1)
        columns.append(state)
    residues = torch.stack(columns, 1).tolist()
    records = [
        ProteinRecord(f"synthetic_{i}", "".join(AMINO_ACIDS[j] for j in row[: int(lengths[i])]))
        for i, row in enumerate(residues)
    ]
    return records


class ProteinDataset(Dataset):
    """Records, randomly cropped to ``max_length`` residues when ``crop`` (else the first ones)."""

    def __init__(self, records: list[ProteinRecord], max_length: int, crop: bool) -> None:
        self.records = records
        self.max_length = max_length
        self.crop = crop

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[str, str]:
        record = self.records[index]
        sequence = record.sequence
        if len(sequence) > self.max_length:
            start = int(torch.randint(0, len(sequence) - self.max_length + 1, (1,))) if self.crop else 0
            sequence = sequence[start : start + self.max_length]
        return record.id, sequence


class ProteinCollate:
    """``[(id, sequence)]`` -> ``{"tokens": (B, T) int64, "ids": list[str]}``."""

    def __init__(self, alphabet: Alphabet) -> None:
        self.converter = alphabet.get_batch_converter()

    def __call__(self, batch: list[tuple[str, str]]) -> dict:
        ids, _, tokens = self.converter(batch)
        return {"tokens": tokens, "ids": ids}


class ProteinDataModule(SplitDataModule):
    """Batches ``{"tokens", "ids"}`` of ESM-tokenised proteins, split train/val/test by seed.

    Args:
        fasta: a FASTA file; ``None`` uses the embedded synthetic set.
        num_sequences / min_length / max_length_synthetic: size of the synthetic set.
        max_length: residues per sequence seen by the model (longer ones are randomly cropped in
            training, cut at the start in evaluation); 1022 matches the published models.
        val_fraction / test_fraction: shares held out, chosen by ``seed``.
    """

    def __init__(
        self,
        fasta: str | None = None,
        batch_size: int = 32,
        max_length: int = 1022,
        num_sequences: int = 2000,
        min_length: int = 40,
        max_length_synthetic: int = 120,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if not 0 < val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise ValueError(f"bad split fractions: val={val_fraction}, test={test_fraction}")
        if fasta is not None and not Path(fasta).is_file():
            raise FileNotFoundError(f"FASTA file {fasta!r} does not exist")
        self.alphabet = Alphabet()
        self.collate = ProteinCollate(self.alphabet)
        self.records: list[ProteinRecord] | None = None
        self.train_set = self.val_set = self.test_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.records is not None:
            return
        hp = self.hparams
        if hp.fasta is None:
            records = synthetic_proteins(hp.num_sequences, hp.min_length, hp.max_length_synthetic, hp.seed)
        else:
            records = read_fasta(hp.fasta, self.alphabet)
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(hp.seed)).tolist()
        n_val = max(1, round(len(records) * hp.val_fraction))
        n_test = round(len(records) * hp.test_fraction)
        if n_val + n_test >= len(records):
            raise ValueError(
                f"{len(records)} sequences are too few to hold out {n_val} + {n_test} for val/test"
            )
        pick = [records[i] for i in order]
        self.records = records
        self.val_set = ProteinDataset(pick[:n_val], hp.max_length, crop=False)
        test = pick[n_val : n_val + n_test]
        self.test_set = ProteinDataset(test, hp.max_length, crop=False) if test else self.val_set
        self.train_set = ProteinDataset(pick[n_val + n_test :], hp.max_length, crop=True)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            collate_fn=self.collate,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )
