"""Protein sequences for ESM-2: 2,086 real bacterial proteins by default, any FASTA file otherwise.

The embedded default ships inside the package (``zoo/protein/data``): the Prodigal proteome that
pyhmmer (MIT) carries in its test data, so training needs no download (credits and the exact
residue mapping in ``zoo/protein/data/README.md``). A user's FASTA file of any size is read through
a byte-offset index (``zoo.protein.fasta.FastaIndex``) built once and cached, so workers
random-access records instead of holding the file in memory.

Bad records (a character outside the ESM alphabet, an empty sequence, a duplicate id, a header
without an id) fail ``setup`` with the file, line and record named, or with ``on_invalid="skip"``
are left out and counted. Records that are mostly ``X`` (assembly gaps, not protein) are left out by
``max_unknown_fraction``. Splits are fixed by record id and seed (``split_by_id``), so they do not
move when the file is reordered.

``predict`` runs on every usable record of ``predict_path`` (a user's FASTA file, not split), or on one
split of the training data (``predict_split``).

A FASTA file converted by ``zoo data optimize --format fasta`` (``zoo.streaming``) is read from its
optimized directory, or that directory's object-store URL, given as ``fasta`` (or ``predict_path``): the
metadata holds each record's length, ``X`` count and id hash, so splits, token budgets and batches are
those of the FASTA file. Bad records were refused, or left out and counted, when it was optimized
(``--on-invalid``); ``on_invalid`` does not apply to it.

``zoo serve`` reads one protein per request, ``{"sequence": "MKT...", "id": optional}``
(``ProteinRequestCodec``), into the batches ``predict`` takes.

Batches are ``{"tokens": (B, T) int64, "ids": [...]}`` (plus ``"contacts"`` (B, T-2, T-2), -1 where
unknown, when contact maps are given), either ``batch_size`` sequences or, with ``max_tokens``,
as many length-sorted sequences as fit in a padded token budget (``TokenBudgetBatchSampler``).
"""

from __future__ import annotations

from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from zoo import streaming
from zoo.datamodules.epoch_plans import EpochPlanBatchSampler
from zoo.datamodules.splits import SplitDataModule
from zoo.errors import MissingFileError, ZooError
from zoo.protein.alphabet import Alphabet
from zoo.protein.fasta import ALLOWED, OK, PROBLEM_NAMES, FastaIndex, ProteinRecord
from zoo.resume import ResumableDataLoader
from zoo.serving import RequestCodec, text_field

__all__ = [
    "ContactMaps",
    "ProteinCollate",
    "ProteinDataModule",
    "ProteinDataset",
    "ProteinRequestCodec",
    "StreamedFasta",
    "TokenBudgetBatchSampler",
    "embedded_fasta",
    "open_usable",
    "split_by_id",
]

EMBEDDED_NAME = "938293.PRJEB85.HG003687.faa.gz"


def embedded_fasta() -> Path:
    """Path of the embedded proteome (pyhmmer's test data, MIT) inside the installed package."""
    return Path(str(resources.files("zoo.protein").joinpath("data", EMBEDDED_NAME)))


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: turns the id hashes into a seed-dependent, uniformly shuffled order."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def split_by_id(
    id_hash: np.ndarray, candidates: np.ndarray, seed: int, val_fraction: float, test_fraction: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(train, val, test)`` record indices, each sorted in file order.

    Records are ranked by a seeded hash of their id: the first ``val_fraction`` go to validation,
    the next ``test_fraction`` to test. The split depends on the ids and the seed only, not on the
    file's order, and exact counts are kept (at least one validation record).
    """
    n = len(candidates)
    n_val = max(1, round(n * val_fraction))
    n_test = round(n * test_fraction)
    if n_val + n_test >= n:
        raise ZooError(f"{n} sequences are too few to hold out {n_val} + {n_test} for val/test")
    key = _mix64(id_hash[candidates] ^ _mix64(np.asarray([seed], dtype=np.uint64))[0])
    ranked = candidates[np.argsort(key, kind="stable")]
    val, test, train = ranked[:n_val], ranked[n_val : n_val + n_test], ranked[n_val + n_test :]
    return np.sort(train), np.sort(val), np.sort(test)


class ContactMaps:
    """Residue contact maps keyed by record id: one ``.npz`` (an ``(L, L)`` array per id) or a folder of
    ``<id>.npy`` files. 1 = contact, 0 = no contact, negative = unknown (ignored by the metric).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            self._ids = {p.stem for p in self.path.glob("*.npy")}
        elif self.path.is_file():
            try:
                with np.load(self.path, allow_pickle=False) as archive:
                    self._ids = set(archive.files)
            except (OSError, ValueError) as error:
                raise ZooError(f"{self.path}: not a readable .npz of contact maps ({error})") from error
        else:
            raise MissingFileError(f"contact maps {str(self.path)!r} do not exist (.npz file or .npy folder)")
        self._archive = None

    def __contains__(self, record_id: str) -> bool:
        return record_id in self._ids

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_archive": None}  # reopened lazily in each worker

    def get(self, record_id: str, length: int) -> np.ndarray | None:
        """The ``(length, length)`` map of ``record_id`` as int8, or ``None`` if the record has none."""
        if record_id not in self._ids:
            return None
        if self.path.is_dir():
            array = np.load(self.path / f"{record_id}.npy", allow_pickle=False)
        else:
            if self._archive is None:
                self._archive = np.load(self.path, allow_pickle=False)
            array = self._archive[record_id]
        if array.shape != (length, length):
            raise ZooError(
                f"{self.path}: contact map of {record_id!r} has shape {array.shape}, "
                f"expected ({length}, {length}) for its {length} residues"
            )
        return np.where(array < 0, -1, array != 0).astype(np.int8)


class ProteinDataset(Dataset):
    """Records of a ``FastaIndex``; sequences longer than ``max_length`` are cropped at a random
    window when ``crop`` (training), else to their first ``max_length`` residues (evaluation)."""

    def __init__(
        self,
        index: FastaIndex,
        records: np.ndarray,
        max_length: int,
        crop: bool,
        contacts: ContactMaps | None = None,
    ) -> None:
        self.index = index
        self.records = np.asarray(records, dtype=np.int64)
        self.max_length = max_length
        self.crop = crop
        self.contacts = contacts

    def __len__(self) -> int:
        return len(self.records)

    def token_lengths(self) -> np.ndarray:
        """Tokens per item after cropping, ``<cls>``/``<eos>`` included (for token-budget batching)."""
        return np.minimum(self.index.length[self.records], self.max_length) + 2

    def __getitem__(self, item: int) -> dict:
        record = self.index.record(int(self.records[item]))  # id and sequence: one sample of a chunk
        record_id, sequence = record.id, record.sequence
        start, length = 0, len(sequence)
        if length > self.max_length:
            if self.crop:
                start = int(torch.randint(0, length - self.max_length + 1, (1,)))
            sequence = sequence[start : start + self.max_length]
        example = {"id": record_id, "sequence": sequence}
        if self.contacts is not None:
            contacts = self.contacts.get(record_id, length)
            if contacts is not None:
                end = start + len(sequence)
                example["contacts"] = contacts[start:end, start:end]
        return example


class ProteinCollate:
    """Examples -> ``{"tokens": (B, T), "ids"}``, plus ``"contacts"`` (B, T-2, T-2) padded with -1."""

    def __init__(self, alphabet: Alphabet) -> None:
        self.converter = alphabet.get_batch_converter()

    def __call__(self, examples: list[dict]) -> dict:
        ids, _, tokens = self.converter([(e["id"], e["sequence"]) for e in examples])
        batch = {"tokens": tokens, "ids": ids}
        if any("contacts" in e for e in examples):
            width = tokens.shape[1] - 2
            contacts = torch.full((len(examples), width, width), -1, dtype=torch.int8)
            for row, example in enumerate(examples):
                if "contacts" in example:
                    n = len(example["contacts"])
                    contacts[row, :n, :n] = torch.from_numpy(np.ascontiguousarray(example["contacts"]))
            batch["contacts"] = contacts
        return batch


class ProteinRequestCodec(RequestCodec):
    """``zoo serve`` requests: ``{"sequence": "MKT...", "id": optional}``, collated as ``predict`` batches.

    A sequence is read as FASTA records are (``zoo.protein.fasta``): the single-letter ESM tokens
    (``LAGVSERTIDPKQNFYMHWCXBUZO.-``), lowercase upper-cased, a final ``*`` (stop codon) dropped; any other
    character (``J``, a digit, whitespace, an inline ``<mask>``) is refused with its position. A sequence longer than
    ``max_length`` is refused, naming the limit: ``zoo predict`` cuts such a FASTA record to its start, but
    a server answering for a cut protein without saying so would mislead.
    """

    fields = {"sequence": "the protein's amino acids, one letter each (ESM alphabet)",
              "id": "optional name, echoed in the answer"}  # fmt: skip
    text_fields = ("sequence", "id")

    def __init__(self, alphabet: Alphabet, max_length: int) -> None:
        self.max_length = max_length
        self.letters = set(ALLOWED.decode()) | set(ALLOWED.decode().lower())
        self._collate = ProteinCollate(alphabet)

    def parse(self, payload) -> dict:
        payload = self.check_keys(payload)
        item_id = text_field(payload, "id", required=False, default="request", max_length=1000)
        sequence = payload.get("sequence")
        if isinstance(sequence, str):
            payload = {**payload, "sequence": sequence.rstrip("*")}
        sequence = text_field(payload, "sequence", max_length=self.max_length, alphabet=self.letters)
        return {"id": item_id, "sequence": sequence.upper()}

    def collate(self, items) -> dict:
        """``{"tokens": (B, T), "ids"}``: ``<cls>``, residues, ``<eos>``, ``<pad>``, as the predict loader."""
        return self._collate(items)


class TokenBudgetBatchSampler(EpochPlanBatchSampler):
    """Length-sorted batches whose padded size (``count x longest``) stays within ``max_tokens``.

    Each epoch, items are shuffled, stably sorted by length and cut greedily into batches; the batch
    order is shuffled too (``shuffle=True``). Only ties change from epoch to epoch, so the number of
    batches is fixed, which Lightning's epoch length and schedulers rely on.

    ``EpochPlanBatchSampler`` shards the batches over DDP ranks.
    """

    def __init__(
        self,
        sampler: Sampler,
        lengths: np.ndarray,
        max_tokens: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        self.sampler = sampler
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if max_tokens < int(self.lengths.max(initial=0)):
            raise ZooError(
                f"max_tokens={max_tokens} is smaller than the longest sequence "
                f"({int(self.lengths.max())} tokens): raise max_tokens or lower max_length"
            )
        self.max_tokens = max_tokens
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last  # accepted for Lightning's re-instantiation; every item is used
        self._count: int | None = None

    def _cut(self, sorted_lengths: np.ndarray) -> list[tuple[int, int]]:
        """Greedy ``[start, end)`` spans over ascending lengths: the last item is each span's longest."""
        spans, start, n = [], 0, len(sorted_lengths)
        while start < n:
            window = sorted_lengths[start : start + max(1, self.max_tokens // int(sorted_lengths[start]))]
            fits = np.arange(1, len(window) + 1) * window <= self.max_tokens
            size = len(window) if fits.all() else max(1, int(np.argmin(fits)))
            spans.append((start, start + size))
            start += size
        return spans

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        generator = np.random.default_rng([self.seed, epoch])
        order = generator.permutation(len(self.lengths)) if self.shuffle else np.arange(len(self.lengths))
        order = order[np.argsort(self.lengths[order], kind="stable")]
        batches = [order[a:b].tolist() for a, b in self._cut(self.lengths[order])]
        if self.shuffle:
            batches = [batches[i] for i in generator.permutation(len(batches))]
        return batches

    def num_epoch_batches(self) -> int:
        if self._count is None:
            self._count = len(self._cut(np.sort(self.lengths)))
        return self._count


class ProteinLoaders(SplitDataModule):
    """Data loaders shared by the protein data modules: fixed ``batch_size`` or a ``max_tokens`` budget."""

    collate: object

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        hp = self.hparams
        common = {"collate_fn": self.collate, "num_workers": hp.num_workers}
        common["persistent_workers"] = hp.num_workers > 0
        if hp.max_tokens is None:
            return ResumableDataLoader(dataset, batch_size=hp.batch_size, shuffle=shuffle, **common)
        # a DistributedSampler over one process still receives Lightning's set_epoch calls
        epochs = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=False, seed=hp.seed)
        sampler = TokenBudgetBatchSampler(epochs, dataset.token_lengths(), hp.max_tokens, shuffle, hp.seed)
        return ResumableDataLoader(dataset, batch_sampler=sampler, **common)


def select_records(
    index: FastaIndex, on_invalid: str, max_unknown_fraction: float
) -> tuple[np.ndarray, dict[str, int]]:
    """Indices of the usable records, and how many were left out for each reason.

    ``on_invalid="error"`` raises on the first bad record (the message names file, line and record,
    and says how many more there are); ``"skip"`` leaves them out.
    """
    bad = index.status != OK
    skipped: Counter = Counter()
    if bad.any():
        if on_invalid == "error":
            first = index.problems(limit=1)[0]
            more = int(bad.sum()) - 1
            hint = f" ({more} more bad records; on_invalid='skip' leaves them out)" if more else ""
            raise ZooError(first.message + hint)
        for code, count in zip(*np.unique(index.status[bad], return_counts=True)):
            skipped[PROBLEM_NAMES[int(code)]] = int(count)
    unknown = ~bad & (index.unknown > max_unknown_fraction * index.length)
    if unknown.any():
        skipped[f"more than {max_unknown_fraction:.0%} X"] = int(unknown.sum())
    return np.flatnonzero(~bad & ~unknown), dict(skipped)


class StreamedFasta:
    """The records of an optimized FASTA directory (``zoo.streaming``) behind the part of ``FastaIndex``
    the data modules use: the per-record arrays come with the metadata (no chunk is read to split or
    batch), the records from the chunks."""

    def __init__(self, optimized: streaming.OptimizedData) -> None:
        self.path = optimized.location
        self.records = optimized.records()
        arrays = optimized.arrays
        self.length, self.unknown, self.id_hash = arrays["length"], arrays["unknown"], arrays["id_hash"]
        self.status = np.full(len(self.length), OK, dtype=np.uint8)  # bad records never reach the chunks
        self.skipped: dict[str, int] = optimized.metadata["skipped"]

    def __len__(self) -> int:
        return len(self.length)

    def record(self, index: int) -> ProteinRecord:
        sample = self.records[index]
        return ProteinRecord(sample["id"], sample["sequence"])

    def record_id(self, index: int) -> str:
        return self.record(index).id


def open_usable(
    path: str | Path, index_dir: str | None, on_invalid: str, max_unknown_fraction: float
) -> tuple[FastaIndex | StreamedFasta, np.ndarray, dict[str, int]]:
    """The index of a FASTA file or of an optimized directory, its usable records, and how many were left
    out for each reason (``select_records``, after those left out when the directory was written; logged)."""
    streamed = streaming.is_optimized(path)
    index = (
        StreamedFasta(streaming.open_optimized(path, "fasta"))
        if streamed
        else FastaIndex.open(path, index_dir)
    )
    usable, skipped = select_records(index, on_invalid, max_unknown_fraction)
    if streamed:  # bad records first, as select_records counts them in a FASTA file
        skipped = {**index.skipped, **skipped}
    if skipped:
        counts = ", ".join(f"{n} {why}" for why, n in skipped.items())
        rank_zero_info(f"{path}: left out {sum(skipped.values())} records ({counts})")
    if len(usable) == 0:
        raise ZooError(f"{path}: no usable records left")
    return index, usable, skipped


def _check_source(source: str | None) -> None:
    """A FASTA file or an optimized directory (or URL): anything else is named before any data is read."""
    if source is None or streaming.is_optimized(source) or Path(source).is_file():
        return
    if Path(source).is_dir():
        raise MissingFileError(
            f"{source!r} is a directory without LitData's index.json: neither a FASTA file nor a directory "
            "written by `zoo data optimize --format fasta`"
        )
    raise MissingFileError(f"FASTA file {source!r} does not exist")


class ProteinDataModule(ProteinLoaders):
    """ESM-tokenised proteins for masked-LM training, split train/val/test by id and seed.

    Args:
        fasta: a FASTA file (plain or gzip), a directory written from one by ``zoo data optimize --format
            fasta``, or that directory's URL (``s3://...``); ``None`` uses the embedded real proteins.
        batch_size: sequences per batch, when ``max_tokens`` is not set.
        max_tokens: padded tokens per batch (``<cls>``/``<eos>`` included); replaces ``batch_size``.
        max_length: residues seen by the model; longer sequences are randomly cropped in training and
            cut to their start in evaluation. 1022 (+2 specials) as the published models.
        val_fraction / test_fraction / seed: the split (``split_by_id``).
        on_invalid: ``"error"`` (default) or ``"skip"`` bad records, with a count.
        max_unknown_fraction: records with more ``X`` than this share are left out (counted).
        contacts: contact maps for evaluation (``.npz`` keyed by id or a folder of ``<id>.npy``);
            validation then reports contact precision.
        index_dir: where the FASTA indexes are cached (default: beside each file, else ~/.cache).
        predict_path: a FASTA file (plain or gzip, or optimized like ``fasta``) whose every usable record
            ``predict`` runs on, e.g. the proteins to embed with a trained model; the same checks and
            ``max_length`` cut as the data.
        predict_split: without ``predict_path``, which records of the data ``predict`` runs on;
            ``"all"`` is every usable record.
    """

    def __init__(
        self,
        fasta: str | None = None,
        batch_size: int = 32,
        max_tokens: int | None = None,
        max_length: int = 1022,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        seed: int = 0,
        on_invalid: Literal["error", "skip"] = "error",
        max_unknown_fraction: float = 0.5,
        contacts: str | None = None,
        index_dir: str | None = None,
        predict_path: str | None = None,
        predict_split: Literal["all", "train", "val", "test"] = "all",
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if max_length < 1:
            raise ZooError(f"max_length must be >= 1, got {max_length}")
        if max_tokens is not None and max_tokens < max_length + 2:
            raise ZooError(f"max_tokens={max_tokens} must be >= max_length + 2 = {max_length + 2}")
        if not 0 < val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise ZooError(f"bad split fractions: val={val_fraction}, test={test_fraction}")
        if on_invalid not in ("error", "skip"):
            raise ZooError(f"on_invalid must be 'error' or 'skip', got {on_invalid!r}")
        for source in (fasta, predict_path):
            _check_source(source)
        if contacts is not None and not Path(contacts).exists():
            raise MissingFileError(f"contact maps {contacts!r} do not exist")
        self.alphabet = Alphabet()
        self.collate = ProteinCollate(self.alphabet)
        self.index: FastaIndex | None = None
        self.skipped: dict[str, int] = {}
        self.predict_set: ProteinDataset | None = None

    @property
    def source(self) -> str | Path:
        """The FASTA file, or the optimized directory (a URL stays a string)."""
        fasta = self.hparams.fasta
        if fasta is None:
            return embedded_fasta()
        return fasta if streaming.is_optimized(fasta) else Path(fasta)

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if stage == "predict" and hp.predict_path is not None:
            if self.predict_set is None:
                index, usable, _ = open_usable(
                    hp.predict_path, hp.index_dir, hp.on_invalid, hp.max_unknown_fraction
                )
                self.predict_set = ProteinDataset(index, usable, hp.max_length, crop=False)
            return
        if self.index is not None:
            return
        index, usable, self.skipped = open_usable(
            self.source, hp.index_dir, hp.on_invalid, hp.max_unknown_fraction
        )
        train, val, test = split_by_id(index.id_hash, usable, hp.seed, hp.val_fraction, hp.test_fraction)
        contacts = ContactMaps(hp.contacts) if hp.contacts is not None else None
        if contacts is not None and not any(index.record_id(int(i)) in contacts for i in val):
            rank_zero_info(f"{hp.contacts}: no validation record has a contact map")
        self.train_set = ProteinDataset(index, train, hp.max_length, crop=True)
        self.val_set = ProteinDataset(index, val, hp.max_length, crop=False, contacts=contacts)
        self.test_set = (
            ProteinDataset(index, test, hp.max_length, crop=False, contacts=contacts)
            if len(test)
            else self.val_set
        )
        if hp.predict_path is None:
            chosen = {"all": usable, "train": train, "val": val, "test": test}[hp.predict_split]
            self.predict_set = ProteinDataset(index, chosen, hp.max_length, crop=False)
        self.index = index

    def request_codec(self) -> ProteinRequestCodec:
        """What ``zoo serve`` reads: one sequence per request, of at most ``max_length`` residues."""
        return ProteinRequestCodec(self.alphabet, self.hparams.max_length)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_set, shuffle=False)
