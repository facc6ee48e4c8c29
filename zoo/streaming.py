"""Data beyond one machine: LitData-optimized copies of the zoo's datasets, read under the zoo's own samplers.

``zoo data optimize --format {images,fasta,captioned} INPUT OUTPUT`` converts an image-folder tree, a FASTA
file or a captioned-image folder into a LitData optimized directory: chunk files and LitData's ``index.json``,
plus what the data modules need before reading any sample: ``zoo-data.json`` (format, record count, class
names and split ranges, caption vocabulary) and ``zoo-data.npz`` (per-record arrays: sequence lengths, ``X``
counts and id hashes, image sizes). Every sample keeps its position in the source (``"position"``), which is
also its index in the directory. A data module reads such a directory, or its object-store URL
(``s3://...``, ``gs://...``), where it reads its own data (``data_dir``, or ``fasta`` for proteins) and
serves the same batches as from the source files.

The samples are read as a map-style dataset (``StreamedRecords``: LitData's ``StreamingDataset[i]``),
under the zoo's samplers and ``zoo.resume.ResumableDataLoader``, not with ``StreamingDataLoader`` and its
shuffle, for three reasons:

- the same order and augmentation as the source files: order comes from ``(seed, epoch)``
  (``SeededSampler``, Lightning's ``DistributedSampler`` under DDP) and each sample's random draws from
  ``(seed, epoch, index)``, whereas LitData's shuffle permutes chunks, then samples within a worker's
  chunks, so its order depends on the chunking, the worker count and the world size;
- exact resume by index: the loader skips the consumed batches of the interrupted epoch without loading
  them, which needs an order that is a function of the epoch;
- batches planned from per-sample sizes: token budgets (proteins) and resolution buckets (captioned
  images) choose which samples go together, which a stream in a fixed order cannot do.

What it costs: on an object store, LitData serves ``dataset[i]`` by two small ranged reads (the sample's
offsets, then its bytes) rather than by downloading its chunk, so a random order pays two requests' latency
per sample (hide it with ``num_workers``), and the chunk cache that makes sequential streaming cheap is not
used: every epoch reads its samples again. A local or network-filesystem directory is read in place, with
no copy, about as fast as the source files (``benchmarks/streaming.py``). Chunks are written uncompressed:
a compressed chunk is decompressed whole before any of its samples can be read.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from zoo.errors import MissingFileError, ZooError
from zoo.extras import require

__all__ = [
    "ARRAYS",
    "FORMATS",
    "METADATA",
    "OptimizedData",
    "StreamedRecords",
    "is_optimized",
    "main",
    "open_optimized",
    "optimize",
]

FORMATS = ("images", "fasta", "captioned")
METADATA = "zoo-data.json"
ARRAYS = "zoo-data.npz"  # per-record arrays, binary: as JSON, 50 million sequences take gigabytes of text
INDEX = "index.json"  # LitData's
VERSION = 1
BLOCK = 256  # at most this many source records per call of a conversion worker


def _litdata(feature: str):
    return require("litdata", extra="streaming", feature=feature)


# ------------------------------------------------------------------------------------------ reading
def is_remote(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def is_optimized(location: str | os.PathLike | None) -> bool:
    """Whether ``location`` names an optimized directory: an object-store URL, or a local folder holding
    LitData's ``index.json`` or the zoo's metadata (a folder with only one of them is reported as incomplete
    by ``open_optimized``)."""
    if location is None:
        return False
    if is_remote(location):
        return True
    path = Path(location)
    return path.is_dir() and ((path / INDEX).is_file() or (path / METADATA).is_file())


def _read(location: str, name: str, parse: Callable[[Path], Any]) -> Any:
    """``parse(file)`` of ``location/name``, from a local folder or an object store (downloaded to a temporary
    folder by LitData's downloaders)."""
    if not is_remote(location):
        path = Path(location) / name
        if not path.is_file():
            raise MissingFileError(
                f"{location!r} has no {name}: not a directory written by `zoo data optimize`, or an "
                "incomplete one (run the optimization again)"
            )
        return parse(path)
    from litdata.streaming.downloader import get_downloader

    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch) / name
        try:
            get_downloader(location, scratch, []).download_file(f"{location.rstrip('/')}/{name}", str(local))
            return parse(local)
        except Exception as error:
            raise MissingFileError(f"could not read {name} of {location!r}: {error}") from error


def _parse_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _parse_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as stored:
        return {name: stored[name] for name in stored.files}


def _sample_count(index: dict) -> int:
    """How many samples LitData's ``index.json`` lists."""
    return sum(int(chunk["chunk_size"]) for chunk in index.get("chunks") or [])


@dataclass(frozen=True)
class OptimizedData:
    """An optimized directory: where it is, its ``zoo-data.json`` and its per-record arrays."""

    location: str
    metadata: dict
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return int(self.metadata["count"])

    def records(self) -> StreamedRecords:
        return StreamedRecords(self.location, self.count)


def open_optimized(location: str | os.PathLike, expected_format: str) -> OptimizedData:
    """The directory's metadata, checked: written by ``zoo data optimize --format expected_format``, and
    complete (LitData's index counts as many samples as the metadata)."""
    _litdata("reading data written by `zoo data optimize`")
    location = str(location)
    index = _read(location, INDEX, _parse_json)
    metadata = _read(location, METADATA, _parse_json)
    found = metadata.get("format")
    if found != expected_format:
        raise ZooError(
            f"{location!r} holds {found!r} data (zoo data optimize --format {found}), but this data module "
            f"reads {expected_format!r} data (--format {expected_format})"
        )
    if metadata.get("version") != VERSION:
        raise ZooError(
            f"{location!r} was written by another version of `zoo data optimize` (format version "
            f"{metadata.get('version')}, this one reads {VERSION}): run the optimization again"
        )
    written = _sample_count(index)
    if written != metadata["count"]:
        raise ZooError(
            f"{location!r} is incomplete: its chunks hold {written} samples, its {METADATA} says "
            f"{metadata['count']} (run the optimization again)"
        )
    arrays = _read(location, ARRAYS, _parse_arrays) if metadata["arrays"] else {}
    if any(len(arrays.get(name, ())) != written for name in metadata["arrays"]):
        raise ZooError(f"{location!r}: its {ARRAYS} does not hold {metadata['arrays']} for every sample")
    return OptimizedData(location, metadata, arrays)


class StreamedRecords:
    """The samples of an optimized directory as a map-style dataset: ``records[i]`` is source record ``i``.

    Each process opens its own ``StreamingDataset`` on first use (a DataLoader worker does not inherit the
    parent's open chunks), decoding one sample a read (``batch_decode=0``): LitData's default decodes a
    window of up to 256 neighbours, which sequential streaming then uses but a random order throws away
    (22 times slower on the proteins). Byte fields come back as ``bytes``: LitData's ``memoryview`` may
    point into a chunk that is unmapped when the next sample is read.
    """

    def __init__(self, location: str, count: int) -> None:
        self.location, self.count = location, count
        self._dataset = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return self.count

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_dataset": None}

    def _open(self):
        if self._dataset is None or self._pid != os.getpid():
            litdata = _litdata("reading data written by `zoo data optimize`")
            self._dataset = litdata.StreamingDataset(self.location, batch_decode=0)
            self._pid = os.getpid()
        return self._dataset

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self.count:
            raise IndexError(f"index {index} out of range for {self.count} samples of {self.location!r}")
        sample = self._open()[index]
        if sample["position"] != index:
            raise ZooError(
                f"{self.location!r}: sample {index} holds source record {sample['position']}; the "
                "directory's order is not the source's (run the optimization again)"
            )
        return {
            key: bytes(value) if isinstance(value, memoryview) else value for key, value in sample.items()
        }


# ------------------------------------------------------------------------------------------ writing
class _FileSamples:
    """Conversion of a block of source positions into samples: each file's bytes as they are (decoded the
    same way as the file would be, no re-encoding), with its fields."""

    def __init__(self, records: list[tuple[str, dict]]) -> None:
        self.records = records

    def __call__(self, block: tuple[int, int]) -> Iterator[dict]:
        for position in range(*block):
            path, fields = self.records[position]
            yield {"position": position, "image": Path(path).read_bytes(), **fields}


class _FastaSamples:
    """Conversion of a block of positions into ``{"position", "id", "sequence"}`` (records of a FASTA index)."""

    def __init__(self, index, records) -> None:
        self.index, self.records = index, records

    def __call__(self, block: tuple[int, int]) -> Iterator[dict]:
        for position in range(*block):
            record = self.index.record(int(self.records[position]))
            yield {"position": position, "id": record.id, "sequence": record.sequence}


Plan = tuple[Callable, int, dict, dict[str, np.ndarray]]  # conversion, record count, metadata, arrays


def _plan_images(source: Path) -> Plan:
    """An image-folder tree (``datamodules/images.py``): its records split after split, and the split
    ranges (``None`` for an unsplit tree, which the data module splits by its seed)."""
    from zoo.datamodules.images import ImageFolderDataset, folder_layout

    layout = folder_layout(source)
    records: list[tuple[str, dict]] = []
    splits, names = {}, None
    for split, root in (layout or {"all": source}).items():
        folder = ImageFolderDataset(root, names, verify=True)
        names, start = folder.class_names, len(records)
        for path, label in folder.samples:
            records.append((str(path), {"label": label, "id": path.relative_to(root).as_posix()}))
        splits[split] = [start, len(records)]
    metadata = {"class_names": names, "splits": splits if layout else None}
    return _FileSamples(records), len(records), metadata, {}


def _plan_fasta(source: Path, on_invalid: str = "error") -> Plan:
    """A FASTA file (``datamodules/proteins.py``): its good records in file order, with the lengths, ``X``
    counts and id hashes that token budgets, ``max_unknown_fraction`` and the split by id need."""
    from zoo.datamodules.proteins import select_records
    from zoo.protein.fasta import FastaIndex

    if not source.is_file():
        raise MissingFileError(f"FASTA file {str(source)!r} does not exist")
    index = FastaIndex.open(source)
    records, skipped = select_records(index, on_invalid, max_unknown_fraction=1.0)
    if len(records) == 0:
        raise ZooError(f"{source}: no usable records")
    arrays = {name: getattr(index, name)[records] for name in ("length", "unknown", "id_hash")}
    return _FastaSamples(index, records), len(records), {"skipped": skipped}, arrays


def _plan_captioned(source: Path, captions_file: str | None = None) -> Plan:
    """A captioned-image folder (``datamodules/captioned_images.py``): images with caption and label, plus
    each image's size (for resolution buckets) and the caption vocabulary."""
    from zoo.datamodules.captioned_images import caption_vocabulary, image_size, read_captioned_folder

    entries, names = read_captioned_folder(source, captions_file, verify=True)
    records = [(str(path), {"caption": caption, "label": label}) for path, caption, label in entries]
    metadata = {
        "class_names": names,
        "caption_vocabulary": caption_vocabulary(caption for _, caption, _ in entries),
    }
    sizes = np.asarray([image_size(path) for path, _, _ in entries], dtype=np.int32).reshape(-1, 2)
    return _FileSamples(records), len(records), metadata, {"sizes": sizes}


PLANS = {"images": _plan_images, "fasta": _plan_fasta, "captioned": _plan_captioned}


@contextlib.contextmanager
def _isolated() -> Iterator[None]:
    """LitData's optimizer changes state beyond its call, which is undone here.

    It empties its scratch folders (``/tmp/chunks``, ``/tmp/data``) when it starts, which would break a
    concurrent optimization: each run gets its own unless the user set them. It also sets multiprocessing's
    start method (spawn) for the whole process, which would make every later DataLoader spawn its workers
    (re-importing torch in each) instead of forking them: the caller's start method is put back.
    """
    names = ("DATA_OPTIMIZER_CACHE_FOLDER", "DATA_OPTIMIZER_DATA_CACHE_FOLDER")
    saved = {name: os.environ.get(name) for name in names}
    start_method = multiprocessing.get_start_method(allow_none=True)
    with tempfile.TemporaryDirectory(prefix="zoo-optimize-") as scratch:
        for name in names:
            os.environ.setdefault(name, os.path.join(scratch, name.lower()))
        try:
            yield
        finally:
            multiprocessing.set_start_method(start_method, force=True)
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def _check_output(output: str | os.PathLike, overwrite: bool) -> None:
    """Refused before any work: an object-store URL, optimized data (unless replaced), other files."""
    if is_remote(output):
        raise ZooError(
            f"OUTPUT {str(output)!r}: write the optimized directory to a local path, then copy it to the "
            "object store (e.g. `aws s3 sync`); data modules read it from its URL"
        )
    output = Path(output)
    if is_optimized(output):
        if not overwrite:
            raise ZooError(f"{str(output)!r} already holds optimized data: pass --overwrite to replace it")
    elif output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ZooError(f"OUTPUT {str(output)!r} exists and is not an empty directory")


def optimize(
    format: str,
    source: str | os.PathLike,
    output: str | os.PathLike,
    num_workers: int = 1,
    chunk_bytes: str | int = "64MB",
    overwrite: bool = False,
    **options: Any,
) -> dict:
    """Write ``source`` as an optimized directory ``output``; returns its metadata.

    ``options``: ``captions_file`` (captioned), ``on_invalid`` (fasta: ``"error"`` or ``"skip"`` bad
    records). LitData keeps the source order (each worker converts one contiguous share, and the shares are
    indexed in turn), so sample ``i`` of the directory is source record ``i``. Its workers are spawned
    processes: a script that calls this needs the ``if __name__ == "__main__":`` guard.
    """
    if format not in PLANS:
        raise ZooError(f"unknown format {format!r}: choose one of {', '.join(FORMATS)}")
    if num_workers < 1:
        raise ZooError(f"num_workers must be >= 1, got {num_workers}")
    litdata = _litdata("zoo data optimize")
    _check_output(output, overwrite)
    source, output = Path(source), Path(output)
    convert, count, metadata, arrays = PLANS[format](source, **options)
    output.mkdir(parents=True, exist_ok=True)
    for name in (METADATA, ARRAYS):  # written last: the JSON's presence marks a complete directory
        (output / name).unlink(missing_ok=True)
    size = min(BLOCK, -(-count // num_workers))  # every worker gets a share of a small source too
    blocks = [(start, min(start + size, count)) for start in range(0, count, size)]
    with _isolated():
        litdata.optimize(
            fn=convert,
            inputs=blocks,
            output_dir=str(output),
            chunk_bytes=chunk_bytes,
            num_workers=min(num_workers, len(blocks)),
            keep_data_ordered=True,
            reorder_files=False,
            mode="overwrite" if overwrite else None,
            verbose=False,
        )
    written = _sample_count(_read(str(output), INDEX, _parse_json))
    if written != count:
        raise ZooError(
            f"{str(output)!r}: the conversion wrote {written} of {count} records (see the errors above)"
        )
    metadata = {"format": format, "version": VERSION, "count": count, "source": str(source), **metadata}
    metadata["arrays"] = sorted(arrays)
    if arrays:
        _write_whole(output / ARRAYS, lambda handle: np.savez(handle, **arrays))
    _write_whole(output / METADATA, lambda handle: handle.write(json.dumps(metadata).encode()))
    return metadata


def _write_whole(path: Path, write: Callable) -> None:
    """``write(handle)`` into a temporary file renamed to ``path``: a reader never sees half a file."""
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("wb") as handle:
        write(handle)
    os.replace(temporary, path)


# ------------------------------------------------------------------------------------------ command
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)b?\s*", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def _byte_count(text: str) -> int:
    """``64MB``, ``1.5g``, ``1000`` as bytes (powers of 1000, as LitData counts), checked here rather than
    failing inside the conversion workers."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 64MB, 256MB, 1GB)")
    return int(float(match[1]) * _UNITS[match[2].lower()])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zoo data",
        description="Data in LitData's streaming format: read by the data modules from a local directory "
        "or an object store, with the same batches as the source files.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser(
        "optimize",
        help="convert an image folder, a FASTA file or a captioned-image folder",
        description="Convert a data module's source into a LitData optimized directory. Pass OUTPUT (or its "
        "URL after copying it to an object store) as data_dir (images, captioned) or fasta (proteins).",
    )
    command.add_argument("--format", required=True, choices=FORMATS, help="what INPUT is")
    command.add_argument(
        "input",
        metavar="INPUT",
        help="images: a class-folder tree (optionally train/ val/ test/); fasta: a FASTA file (plain or "
        "gzip); captioned: a folder of images with a .txt caption each, or with --captions-file",
    )
    command.add_argument("output", metavar="OUTPUT", help="the local directory to write")
    command.add_argument(
        "--num-workers",
        type=int,
        default=os.cpu_count() or 1,
        help="conversion processes (default: one a CPU)",
    )
    command.add_argument(
        "--chunk-bytes", type=_byte_count, default="64MB", help="target chunk size: 64MB (default), 256MB..."
    )
    command.add_argument("--captions-file", help="captioned: a JSONL file of {file, caption, label?} records")
    command.add_argument(
        "--on-invalid",
        choices=("error", "skip"),
        help="fasta: stop at the first bad record (default: error) or leave bad records out, counted",
    )
    command.add_argument("--overwrite", action="store_true", help="replace optimized data in OUTPUT")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """``zoo data optimize ...``."""
    args = _parser().parse_args(argv)
    options = {"captions_file": args.captions_file, "on_invalid": args.on_invalid}
    for option, applies_to in (("captions_file", "captioned"), ("on_invalid", "fasta")):
        if options[option] is not None and args.format != applies_to:
            flag = "--" + option.replace("_", "-")
            raise ZooError(f"{flag} applies to --format {applies_to}, not to --format {args.format}")
    options = {option: value for option, value in options.items() if value is not None}
    metadata = optimize(
        args.format,
        args.input,
        args.output,
        num_workers=args.num_workers,
        chunk_bytes=args.chunk_bytes,
        overwrite=args.overwrite,
        **options,
    )
    skipped = sum(metadata.get("skipped", {}).values())
    note = f", {skipped} bad records left out" if skipped else ""
    print(f"zoo: wrote {args.output} ({metadata['count']} records{note})")
