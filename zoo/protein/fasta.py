"""Random access to FASTA files of any size through a byte-offset index, built once and cached.

A UniRef-sized FASTA file (tens of GB) cannot be parsed into memory by every data-loader worker.
``FastaIndex`` scans the file once (in blocks, the scanning done by ``re`` and ``bytes``
methods in C), records where each record's header and sequence lie, and saves those offsets as a
small ``.npz`` beside the file (or in a cache directory when that is not writable). Later runs load
the index in milliseconds; it is rebuilt when the file's size, modification time or head/tail bytes
change. A record is then one ``seek`` + ``read``.

Residue mapping, the same for every file (documented in ``zoo/protein/README.md``):

- lowercase letters are upper-cased; whitespace inside a sequence is ignored;
- a trailing ``*`` (a stop codon, as Prodigal writes) is dropped; ``*`` anywhere else is an error;
- ``X`` (unknown residue) and the other ESM letters (``BUZO.-``) are kept as their ESM tokens;
- any other character (``J``, digits, ...) is a problem of the record.

The scan reads the file in 16 MiB blocks and never raises on a bad record: it records the problem (bad character, empty sequence,
duplicate id) with its byte offset, so that the caller decides whether to fail (naming the file,
the line and the record) or to skip such records and report how many. Gzip-compressed files (found
by their magic bytes) are decompressed into memory and indexed there, without a saved index: use
plain files for large data.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zoo.errors import MissingFileError, ZooError
from zoo.protein.alphabet import Alphabet

__all__ = ["FastaIndex", "FastaProblem", "ProteinRecord", "clean_sequence", "id_hash", "read_fasta"]

INDEX_VERSION = 2
OK, BAD_CHARACTER, EMPTY, DUPLICATE, BAD_HEADER = 0, 1, 2, 3, 4
PROBLEM_NAMES = {
    BAD_CHARACTER: "bad character",
    EMPTY: "empty sequence",
    DUPLICATE: "duplicate id",
    BAD_HEADER: "header without an id",
}

_HEADER = re.compile(rb"^>", re.MULTILINE)
_WHITESPACE = b" \t\r\n\v\f"
# residues after mapping: the single-character ESM tokens
ALLOWED = bytes("".join(t for t in Alphabet().all_toks if len(t) == 1), "ascii")
_UPPER = bytes.maketrans(b"abcdefghijklmnopqrstuvwxyz", b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_GZIP_MAGIC = b"\x1f\x8b"
_FINGERPRINT_BYTES = 1 << 16


@dataclass(frozen=True)
class ProteinRecord:
    id: str
    sequence: str


@dataclass(frozen=True)
class FastaProblem:
    """One bad record: what is wrong, where (1-based line), and a message naming file, line and record."""

    kind: str
    record: int
    line: int
    message: str


def clean_sequence(region: bytes) -> bytes:
    """Residues of one record after the documented mapping (upper-case, no whitespace, no final ``*``)."""
    return region.translate(_UPPER, _WHITESPACE).rstrip(b"*")


def id_hash(record_id: bytes) -> int:
    """64-bit hash of a record id: the index's key for splits and duplicate checks."""
    return int.from_bytes(hashlib.blake2b(record_id, digest_size=8).digest(), "little")


class FastaIndex:
    """Byte offsets, residue counts and problems of every record of a FASTA file.

    Arrays (one entry per record, in file order; 41 bytes a record): ``header_start`` (offset of
    ``>``), ``seq_start`` / ``seq_end`` (the sequence lines), ``length`` (residues after mapping),
    ``unknown`` (``X`` count), ``id_hash`` (64-bit hash of the id, for splits and duplicates) and
    ``status`` (``OK`` or a problem code). Bad records also get a byte offset pointing at the problem
    (``problem_record`` -> ``problem_offset``, sorted by record).
    """

    ARRAYS = (
        "header_start",
        "seq_start",
        "seq_end",
        "length",
        "unknown",
        "id_hash",
        "status",
        "problem_record",
        "problem_offset",
    )
    _DTYPES = {"q": np.int64, "i": np.int32, "Q": np.uint64, "B": np.uint8}
    _COLUMNS = {
        "header_start": "q",
        "seq_start": "q",
        "seq_end": "q",
        "length": "i",
        "unknown": "i",
        "id_hash": "Q",
        "status": "B",
    }
    _BLOCK = 1 << 24  # bytes read at a time while scanning

    def __init__(self, path: Path, data: bytes | None, arrays: dict[str, np.ndarray]) -> None:
        self.path = path
        self._data = data  # decompressed content of a gzip file; None for plain files (read from disk)
        for name in self.ARRAYS:
            setattr(self, name, arrays[name])
        self._handle = None
        self._pid = None

    # ---------------------------------------------------------------- building
    @classmethod
    def open(cls, path: str | Path, index_dir: str | Path | None = None) -> FastaIndex:
        """The index of ``path``: loaded from its cache when still valid, else built and saved."""
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"FASTA file {str(path)!r} does not exist")
        with path.open("rb") as handle:
            compressed = handle.read(2) == _GZIP_MAGIC
        if compressed:
            try:
                data = gzip.decompress(path.read_bytes())
            except (OSError, EOFError) as error:
                raise ZooError(f"{path}: not a readable gzip file ({error})") from error
            stream = io.BytesIO(data)
            return cls(path, data, cls._scan(stream.read, lambda a, b: data[a:b], path))
        key = cls._validity_key(path)
        for candidate in cls._index_paths(path, index_dir):
            arrays = cls._load(candidate, key)
            if arrays is not None:
                return cls(path, None, arrays)
        if path.stat().st_size == 0:
            raise ZooError(f"{path}: empty file, not FASTA (expected '>id' header lines)")
        with path.open("rb") as stream, path.open("rb") as lookup:

            def read_at(start: int, end: int) -> bytes:
                lookup.seek(start)
                return lookup.read(end - start)

            arrays = cls._scan(stream.read, read_at, path)
        for candidate in cls._index_paths(path, index_dir):
            if cls._save(candidate, arrays, key):
                break
        return cls(path, None, arrays)

    @classmethod
    def _scan(cls, read: Callable[[int], bytes], read_at: Callable[[int, int], bytes], path: Path) -> dict:
        """One streaming pass in blocks: header positions by regex, each sequence checked by C-level
        ``bytes`` operations; columns kept in compact ``array`` buffers, so memory stays ~41 bytes a
        record plus one block, whatever the file size."""
        columns = {name: array(code) for name, code in cls._COLUMNS.items()}
        problems: dict[int, int] = {}
        buffer, base, skipped_lines = read(cls._BLOCK), 0, 0
        while buffer and not buffer.strip():  # leading blank blocks
            base, skipped_lines = base + len(buffer), skipped_lines + buffer.count(b"\n")
            buffer = read(cls._BLOCK)
        first = re.search(rb"\S", buffer)
        if first is None:
            raise ZooError(f"{path}: no FASTA records found (expected '>id' header lines)")
        if buffer[first.start() : first.start() + 1] != b">":
            line = skipped_lines + buffer[: first.start()].count(b"\n") + 1
            raise ZooError(f"{path}:{line}: not a FASTA file (expected a '>' header line first)")
        buffer, base = buffer[first.start() :], base + first.start()
        eof = False
        while True:
            block = b"" if eof else read(cls._BLOCK)
            eof = eof or not block
            buffer += block
            starts = [m.start() for m in _HEADER.finditer(buffer)]
            if not eof and len(starts) < 2:
                continue  # a record longer than a block: read on
            complete = len(starts) if eof else len(starts) - 1  # the last may go on in the next block
            for k in range(complete):
                end = starts[k + 1] if k + 1 < len(starts) else len(buffer)
                cls._add_record(buffer, starts[k], end, base, columns, problems)
            if eof:
                break
            buffer, base = buffer[starts[-1] :], base + starts[-1]
        arrays = {
            name: np.frombuffer(col, dtype=cls._DTYPES[col.typecode]).copy() for name, col in columns.items()
        }
        cls._mark_duplicates(arrays, problems, read_at)
        records = np.asarray(sorted(problems), dtype=np.int64)
        arrays["problem_record"] = records
        arrays["problem_offset"] = np.asarray([problems[r] for r in records.tolist()], dtype=np.int64)
        return arrays

    @classmethod
    def _add_record(
        cls, buffer: bytes, start: int, end: int, base: int, columns: dict, problems: dict
    ) -> None:
        header_end = buffer.find(b"\n", start, end)
        header_end = end if header_end == -1 else header_end
        seq_start = min(header_end + 1, end)
        header = buffer[start + 1 : header_end].strip()
        record_id = header.split(maxsplit=1)[0] if header else b""
        region = buffer[seq_start:end]
        residues = clean_sequence(region)
        status = OK
        if not record_id:
            status = BAD_HEADER
        elif not residues:
            status = EMPTY
        elif residues.translate(None, ALLOWED):
            status = BAD_CHARACTER
            problems[len(columns["status"])] = base + seq_start + cls._first_bad(region)
        columns["header_start"].append(base + start)
        columns["seq_start"].append(base + seq_start)
        columns["seq_end"].append(base + end)
        columns["length"].append(len(residues))
        columns["unknown"].append(residues.count(b"X"))
        columns["id_hash"].append(id_hash(record_id))
        columns["status"].append(status)

    @staticmethod
    def _first_bad(region: bytes) -> int:
        """Offset in ``region`` of its first character outside the mapping (only called on a bad record)."""
        body_end = len(region.rstrip(_WHITESPACE).rstrip(b"*"))
        for offset in range(body_end):
            char = region[offset : offset + 1].translate(_UPPER)
            if char not in _WHITESPACE and char not in ALLOWED:
                return offset
        return 0

    @staticmethod
    def _mark_duplicates(arrays: dict[str, np.ndarray], problems: dict[int, int], read_at) -> None:
        """Every occurrence of an id after its first is a ``DUPLICATE`` (its problem offset: the first's
        header). Candidates come from equal 64-bit hashes; the ids themselves are compared."""

        def record_id(record: int) -> bytes:
            header = read_at(int(arrays["header_start"][record]) + 1, int(arrays["seq_start"][record]))
            parts = header.split(maxsplit=1)
            return parts[0] if parts else b""

        hashes = arrays["id_hash"]
        order = np.argsort(hashes, kind="stable")
        sorted_hashes = hashes[order]
        repeated = np.flatnonzero(sorted_hashes[1:] == sorted_hashes[:-1]) + 1
        for position in repeated:
            first = position - 1
            while first > 0 and sorted_hashes[first - 1] == sorted_hashes[position]:
                first -= 1
            record, original = int(order[position]), int(order[first])
            if arrays["status"][record] == BAD_HEADER or record_id(record) != record_id(original):
                continue
            arrays["status"][record] = DUPLICATE
            problems[record] = int(arrays["header_start"][original])

    # ------------------------------------------------------------------ caching
    @staticmethod
    def _validity_key(path: Path) -> np.ndarray:
        """Size, mtime and a hash of the first and last 64 KiB: any edit changes at least one of them."""
        stat = path.stat()
        digest = hashlib.blake2b(digest_size=8)
        with path.open("rb") as handle:
            digest.update(handle.read(_FINGERPRINT_BYTES))
            handle.seek(max(0, stat.st_size - _FINGERPRINT_BYTES))
            digest.update(handle.read())
        fingerprint = int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1)
        return np.asarray([INDEX_VERSION, stat.st_size, stat.st_mtime_ns, fingerprint], dtype=np.int64)

    @staticmethod
    def _index_paths(path: Path, index_dir: str | Path | None) -> list[Path]:
        """Where the index may live: ``index_dir`` if given, else beside the file, then the user cache."""
        name = f"{path.name}.zoo-index.npz"
        if index_dir is not None:
            return [Path(index_dir) / name]
        cache = (
            Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lightning-zoo" / "fasta-index"
        )
        tag = hashlib.blake2b(str(path.resolve()).encode(), digest_size=8).hexdigest()
        return [path.with_name(name), cache / f"{tag}-{name}"]

    @staticmethod
    def _load(candidate: Path, key: np.ndarray) -> dict[str, np.ndarray] | None:
        if not candidate.is_file():
            return None
        try:
            with np.load(candidate, allow_pickle=False) as stored:
                if not np.array_equal(stored["key"], key):
                    return None
                return {name: stored[name] for name in FastaIndex.ARRAYS}
        except (OSError, KeyError, ValueError):
            return None  # unreadable or from another version: rebuild

    @staticmethod
    def _save(candidate: Path, arrays: dict[str, np.ndarray], key: np.ndarray) -> bool:
        """Write atomically (temporary name, then rename); ``False`` where the location is not writable."""
        tmp = candidate.with_name(f".{candidate.name}.{os.getpid()}.tmp.npz")
        try:
            candidate.parent.mkdir(parents=True, exist_ok=True)
            np.savez(tmp, key=key, **arrays)
            os.replace(tmp, candidate)
            return True
        except OSError:
            tmp.unlink(missing_ok=True)
            return False

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self.header_start)

    def _read(self, start: int, end: int) -> bytes:
        if self._data is not None:
            return self._data[start:end]
        if self._handle is None or self._pid != os.getpid():  # one handle per (forked) worker
            self._handle = self.path.open("rb")
            self._pid = os.getpid()
        self._handle.seek(start)
        return self._handle.read(end - start)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handle"] = None  # file handles do not cross process boundaries
        return state

    def header(self, index: int) -> str:
        """The whole header line without ``>`` (id and description)."""
        header = self._read(int(self.header_start[index]) + 1, int(self.seq_start[index]))
        return header.strip().decode("utf-8", errors="replace")

    def record_id(self, index: int) -> str:
        parts = self.header(index).split(maxsplit=1)
        return parts[0] if parts else ""

    def sequence(self, index: int) -> str:
        return clean_sequence(self._read(int(self.seq_start[index]), int(self.seq_end[index]))).decode(
            "ascii"
        )

    def record(self, index: int) -> ProteinRecord:
        return ProteinRecord(self.record_id(index), self.sequence(index))

    # ----------------------------------------------------------------- problems
    def line_of(self, offset: int) -> int:
        """1-based line number of a byte offset (counts newlines; only used for error messages)."""
        count, position, chunk = 0, 0, 1 << 24
        while position < offset:
            count += self._read(position, min(position + chunk, offset)).count(b"\n")
            position += chunk
        return count + 1

    def problems(self, limit: int | None = None) -> list[FastaProblem]:
        """The bad records in file order (the first ``limit`` of them), each with a full message."""
        bad = np.flatnonzero(self.status != OK)
        found = []
        for record in bad[:limit]:
            found.append(self._describe(int(record)))
        return found

    def _problem_offset(self, record: int) -> int:
        return int(self.problem_offset[np.searchsorted(self.problem_record, record)])

    def _describe(self, record: int) -> FastaProblem:
        status = int(self.status[record])
        header_line = self.line_of(int(self.header_start[record]))
        name = self.record_id(record)
        if status == BAD_HEADER:
            message = f"{self.path}:{header_line}: header without an id (expected '>id description')"
            return FastaProblem("bad header", record, header_line, message)
        if status == EMPTY:
            message = f"{self.path}:{header_line}: record {name!r} has an empty sequence"
            return FastaProblem("empty sequence", record, header_line, message)
        if status == DUPLICATE:
            first_line = self.line_of(self._problem_offset(record))
            message = f"{self.path}:{header_line}: duplicate id {name!r} (first seen on line {first_line})"
            return FastaProblem("duplicate id", record, header_line, message)
        offset = self._problem_offset(record)
        line = self.line_of(offset)
        line_start = self._read(max(0, offset - 65536), offset).rfind(b"\n")
        column = 65536 - line_start if offset >= 65536 else offset - line_start
        char = self._read(offset, offset + 1).decode("utf-8", errors="replace")
        message = (
            f"{self.path}:{line}: record {name!r} has {char!r} at column {column}, outside the ESM "
            f"alphabet ({ALLOWED.decode()}; lowercase is upper-cased, a final '*' is dropped)"
        )
        return FastaProblem("bad character", record, line, message)


def invalid_residue(residues: bytes) -> int | None:
    """Offset of the first character outside the ESM alphabet in mapped residues, or ``None``."""
    if not residues.translate(None, ALLOWED):
        return None
    return next(i for i in range(len(residues)) if residues[i : i + 1] not in ALLOWED)


def read_fasta(path: str | Path, index_dir: str | Path | None = None) -> list[ProteinRecord]:
    """All records of a (small) FASTA file; the first bad record is a ``ValueError`` naming file and line."""
    index = FastaIndex.open(path, index_dir)
    problems = index.problems(limit=1)
    if problems:
        raise ZooError(problems[0].message)
    return [index.record(i) for i in range(len(index))]
