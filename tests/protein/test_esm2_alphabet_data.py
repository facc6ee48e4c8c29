"""Alphabet (fair-esm's order, clear errors) and the protein data module (synthetic set, FASTA checks)."""

from __future__ import annotations

import pytest
import torch

from zoo.datamodules.protein import ProteinDataModule, read_fasta, synthetic_proteins
from zoo.protein import Alphabet

esm = pytest.importorskip("esm")


def test_alphabet_equals_fair_esm():
    ours, theirs = Alphabet(), esm.data.Alphabet.from_architecture("ESM-1b")
    assert ours.all_toks == theirs.all_toks and len(ours) == 33
    for name in ("cls_idx", "padding_idx", "eos_idx", "unk_idx", "mask_idx"):
        assert getattr(ours, name) == getattr(theirs, name), name
    batch = [("a", "MKT<mask>AY"), ("b", "ACDEFGHIKLMNPQRSTVWYXBUZO.-"), ("c", "M")]
    for truncation in (None, 3):
        _, _, expected = theirs.get_batch_converter(truncation)(batch)
        _, _, tokens = ours.get_batch_converter(truncation)(batch)
        assert torch.equal(tokens, expected)


def test_alphabet_unknown_characters_are_clear_errors():
    alphabet = Alphabet()
    assert alphabet.encode("mkt") == alphabet.encode("MKT")  # lowercase is upper-cased
    assert alphabet.encode("MKT*") == alphabet.encode("MKT")  # a trailing stop is dropped
    with pytest.raises(ValueError, match=r"seq7: character 'J' at residue 3"):
        alphabet.get_batch_converter()([("seq7", "MKJT")])
    with pytest.raises(ValueError, match="empty batch"):
        alphabet.get_batch_converter()([])


def test_synthetic_proteins_are_deterministic():
    first = synthetic_proteins(20, 10, 30, seed=1)
    assert first == synthetic_proteins(20, 10, 30, seed=1)
    assert first != synthetic_proteins(20, 10, 30, seed=2)
    assert all(10 <= len(r.sequence) <= 30 for r in first)


def test_datamodule_synthetic_splits_and_batches():
    data = ProteinDataModule(
        batch_size=4, num_sequences=40, min_length=5, max_length_synthetic=20, max_length=12
    )
    data.setup("fit")
    ids = [r for s in (data.train_set, data.val_set, data.test_set) for r in (x.id for x in s.records)]
    assert len(ids) == len(set(ids)) == 40
    batch = next(iter(data.train_dataloader()))
    assert batch["tokens"].dtype == torch.int64 and batch["tokens"].shape[0] == 4
    assert batch["tokens"].shape[1] <= 12 + 2 and (batch["tokens"][:, 0] == 0).all()


def _write(tmp_path, text: str):
    path = tmp_path / "seqs.fasta"
    path.write_text(text)
    return path


def test_read_fasta(tmp_path):
    path = _write(tmp_path, ">p1 first protein\nMKTAY\nIAKQ*\n\n>p2\nacdef\n")
    records = read_fasta(path)
    assert [(r.id, r.sequence) for r in records] == [("p1", "MKTAYIAKQ"), ("p2", "ACDEF")]
    data = ProteinDataModule(fasta=str(path), batch_size=2, val_fraction=0.5, test_fraction=0.0)
    data.setup("fit")
    assert len(data.train_set) == 1 and len(data.val_set) == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("MKT\n>p1\nMKT\n", r"seqs.fasta:1: not a FASTA file"),
        (">p1\nMKT\n>p2\nMKJT\n", r"seqs.fasta:4: record 'p2' has 'J' at column 3"),
        (">p1\nMKT\n>p1\nMKT\n", r"seqs.fasta:3: duplicate id 'p1' \(first seen on line 1\)"),
        (">p1\n>p2\nMKT\n", r"seqs.fasta:1: record 'p1' has an empty sequence"),
        (">\nMKT\n", r"seqs.fasta:1: header without an id"),
        ("\n\n", r"no FASTA records"),
    ],
)
def test_bad_fasta_names_file_and_line(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        read_fasta(_write(tmp_path, text))


def test_missing_fasta():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ProteinDataModule(fasta="/no/such.fasta")
