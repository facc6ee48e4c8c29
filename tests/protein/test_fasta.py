"""FastaIndex: random access equals a plain parse, the index is cached and invalidated, bad input is named."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest

from zoo.datamodules.proteins import embedded_fasta, select_records
from zoo.protein.fasta import FastaIndex, read_fasta


def _parse(text: str) -> list[tuple[str, str]]:
    """Reference parse of a valid FASTA text, written independently of the index."""
    records = []
    for block in text.split(">")[1:]:
        header, *lines = block.split("\n")
        records.append((header.split()[0], "".join(lines).replace(" ", "").upper().rstrip("*")))
    return records


def _write(tmp_path, text: str, name: str = "seqs.fasta"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("block", [37, 1 << 24], ids=["tiny-blocks", "default-blocks"])
def test_random_access_equals_a_plain_parse(tmp_path, monkeypatch, block):
    monkeypatch.setattr(FastaIndex, "_BLOCK", block)  # records straddle many block boundaries
    rng = np.random.default_rng(0)
    letters = np.array(list("LAGVSERTIDPKQNFYMHWCX"))
    lines = []
    for i in range(200):
        sequence = "".join(rng.choice(letters, rng.integers(1, 300)))
        width = int(rng.integers(10, 80))
        body = "\n".join(sequence[j : j + width] for j in range(0, len(sequence), width))
        lines.append(
            f">rec{i} some description\n{body.lower() if i % 7 == 0 else body}{'*' if i % 3 == 0 else ''}"
        )
    text = "\n".join(lines) + "\n"
    path = _write(tmp_path, text)
    index = FastaIndex.open(path, index_dir=tmp_path / "cache")
    expected = _parse(text)
    assert len(index) == 200
    for i in rng.permutation(200)[:60]:  # random order: seek + read
        assert (index.record_id(i), index.sequence(i)) == expected[i]
        assert index.length[i] == len(expected[i][1])
    assert [(r.id, r.sequence) for r in read_fasta(path, tmp_path / "cache")] == expected


def test_index_is_saved_beside_the_file_reused_and_rebuilt_on_change(tmp_path):
    path = _write(tmp_path, ">a\nMKT\n>b\nACDE\n")
    FastaIndex.open(path)
    saved = tmp_path / "seqs.fasta.zoo-index.npz"
    assert saved.is_file()
    stamp = saved.stat().st_mtime_ns
    assert len(FastaIndex.open(path)) == 2 and saved.stat().st_mtime_ns == stamp  # reused, not rewritten
    path.write_text(">a\nMKT\n>b\nACDE\n>c\nWW\n")
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))
    index = FastaIndex.open(path)
    assert len(index) == 3 and index.sequence(2) == "WW"


def test_unwritable_location_falls_back_to_the_cache_dir(tmp_path, monkeypatch):
    path = _write(tmp_path, ">a\nMKT\n")
    (tmp_path / "seqs.fasta.zoo-index.npz").mkdir()  # the index cannot be written beside the file
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    FastaIndex.open(path)
    cached = list((tmp_path / "xdg" / "lightning-zoo" / "fasta-index").glob("*seqs.fasta.zoo-index.npz"))
    assert len(cached) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seqs.fasta", "seqs.fasta.zoo-index.npz", "xdg"]
    assert len(FastaIndex.open(path)) == 1  # and is found there next time


def test_gzip_is_read_by_its_magic_bytes(tmp_path):
    path = tmp_path / "seqs.data"
    path.write_bytes(gzip.compress(b">a\nMKT*\n>b\nac\n"))
    index = FastaIndex.open(path)
    assert [index.record(i).sequence for i in range(2)] == ["MKT", "AC"]


def test_embedded_proteins_are_the_pyhmmer_proteome():
    index = FastaIndex.open(embedded_fasta())
    assert len(index) == 2100 and (index.status == 0).all()
    assert int(index.length.sum()) == 682_583 - 2_099  # residues minus the trailing stops
    usable, skipped = select_records(index, "error", 0.5)
    assert len(usable) == 2086 and skipped == {"more than 50% X": 14}
    assert index.record_id(0) == "938293.PRJEB85.HG003688_1" and index.sequence(0).startswith("MNINELLKDK")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("MKT\n>p1\nMKT\n", r"seqs.fasta:1: not a FASTA file"),
        ("\n\n  ID   P12345\n", r"seqs.fasta:3: not a FASTA file"),
        (">p1\nMKT\n>p2\nMK\nMKJT\n", r"seqs.fasta:5: record 'p2' has 'J' at column 3"),
        (">p1\nMK*T\n", r"seqs.fasta:2: record 'p1' has '\*' at column 3"),
        (">p1\nMKT\n>p1\nMKT\n", r"seqs.fasta:3: duplicate id 'p1' \(first seen on line 1\)"),
        (">p1\n>p2\nMKT\n", r"seqs.fasta:1: record 'p1' has an empty sequence"),
        (">p1\n*\n", r"seqs.fasta:1: record 'p1' has an empty sequence"),
        (">\nMKT\n", r"seqs.fasta:1: header without an id"),
        ("\n\n", r"no FASTA records"),
        ("", r"empty file"),
    ],
)
@pytest.mark.parametrize("block", [5, 1 << 24], ids=["tiny-blocks", "default-blocks"])
def test_bad_fasta_names_file_line_and_record(tmp_path, monkeypatch, text, message, block):
    monkeypatch.setattr(FastaIndex, "_BLOCK", block)
    with pytest.raises(ValueError, match=message):
        read_fasta(_write(tmp_path, text))


def test_binary_file_is_not_fasta(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(b"PK\x03\x04" + bytes(range(256)))
    with pytest.raises(ValueError, match="not a FASTA file"):
        FastaIndex.open(path)


def test_skip_counts_each_problem(tmp_path):
    path = _write(tmp_path, ">a\nMKT\n>b\nMJK\n>a\nMKT\n>c\n>d\nXXXXM\n>e\nWWW\n")
    index = FastaIndex.open(path)
    with pytest.raises(ValueError, match=r"record 'b' has 'J'.*\(2 more bad records; on_invalid='skip'"):
        select_records(index, "error", 0.5)
    usable, skipped = select_records(index, "skip", 0.5)
    assert [index.record_id(int(i)) for i in usable] == ["a", "e"]
    assert skipped == {"bad character": 1, "empty sequence": 1, "duplicate id": 1, "more than 50% X": 1}


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FastaIndex.open("/no/such.fasta")
