"""Several task datasets, batched per task and combined for one multitask training step.

Two ways to serve a step (``mode``):

- a Lightning ``CombinedLoader`` mode (``max_size_cycle``, ``min_size``, ``max_size``): every
  step holds one batch of *each* task (``{task: batch}``; ``None`` for a task already exhausted
  under ``max_size``). What GradNorm and per-step comparisons of task losses need.
  ``sequential`` serves one task's loader after another, which ``fit`` cannot train on: it is
  rejected with an explanation.
- a task sampler (``round_robin`` or ``proportional``): every step holds one batch of *one*
  task; tasks take turns, or are drawn in proportion to their number of batches. The cost of a
  step no longer grows with the number of tasks.

Within a task, batches are length-bucketed: indices are shuffled, cut into pools of
``bucket_size`` batches, sorted by length inside each pool, so a batch pads little but the
order stays random. Validation/test go through the tasks one after another, sorted by length.

The embedded default is the arithmetic tasks of ``zoo.multitask.arithmetic`` (deterministic from
``seed``; validation and test expressions never occur in the training set). ``data_dir``
switches to JSONL files, ``<data_dir>/<task>/{train,val,test}.jsonl`` (test optional), one object
per line: ``{"text": ...}`` (or ``"tokens": [...]``) plus ``"label"`` (int) for sequence
classification, ``"tags"`` (ints, one per token) for token classification, ``"target"`` (number or
list) for regression, ``"target"`` (text) for generation. Problems are reported with the file,
the line and the task.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset, Sampler

from zoo.datamodules.splits import SplitDataModule
from zoo.multitask.arithmetic import (
    ALPHABET,
    REGRESSION_SCALE,
    ROLE_TAGS,
    corrupt,
    is_well_formed,
    parse,
    random_expression,
)
from zoo.multitask.tasks import (
    GENERATION,
    REGRESSION,
    SEQUENCE_CLASSIFICATION,
    TOKEN_CLASSIFICATION,
    TaskSpec,
    validate_tasks,
)
from zoo.multitask.vocab import EOS_ID, PAD_ID, Vocabulary

__all__ = [
    "ARITHMETIC_TASKS",
    "MultitaskDataModule",
    "TaskBatchSampler",
    "TaskDataset",
    "arithmetic_examples",
    "read_task_jsonl",
]

IGNORE_INDEX = -100
COMBINED_MODES = ("max_size_cycle", "min_size", "max_size", "sequential")
SAMPLER_MODES = ("round_robin", "proportional")

#: the embedded tasks: name -> declaration (a YAML ``tasks:`` list may pick and re-weight them)
ARITHMETIC_TASKS: dict[str, TaskSpec] = {
    "wellformed": TaskSpec("wellformed", SEQUENCE_CLASSIFICATION, num_classes=2),
    "roles": TaskSpec("roles", TOKEN_CLASSIFICATION, num_classes=len(ROLE_TAGS)),
    "value": TaskSpec("value", GENERATION, max_target_length=8),
    "value_regression": TaskSpec("value_regression", REGRESSION, num_classes=1),
}
DEFAULT_TASKS = ("wellformed", "roles", "value")


@dataclass
class Example:
    input_ids: list[int]
    label: Any = None  # int | list[int] | list[float]
    target_ids: list[int] | None = None


class TaskDataset(Dataset):
    """One task's encoded examples; ``collate`` pads a list of indices into a batch dict."""

    def __init__(self, spec: TaskSpec, examples: list[Example]) -> None:
        self.spec = spec
        self.examples = examples
        self.lengths = [len(e.input_ids) for e in examples]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]

    def collate(self, indices) -> dict[str, torch.Tensor]:
        examples = [self.examples[i] for i in indices]
        width = max(len(e.input_ids) for e in examples)
        ids = torch.full((len(examples), width), PAD_ID, dtype=torch.long)
        for row, e in enumerate(examples):
            ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        batch = {"input_ids": ids, "padding_mask": ids.ne(PAD_ID)}
        kind = self.spec.type
        if kind == SEQUENCE_CLASSIFICATION:
            batch["labels"] = torch.tensor([e.label for e in examples], dtype=torch.long)
        elif kind == TOKEN_CLASSIFICATION:
            labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
            for row, e in enumerate(examples):
                labels[row, : len(e.label)] = torch.tensor(e.label)
            batch["labels"] = labels
        elif kind == REGRESSION:
            batch["labels"] = torch.tensor([e.label for e in examples], dtype=torch.float32)
        else:
            length = max(len(e.target_ids) for e in examples)
            targets = torch.full((len(examples), length), PAD_ID, dtype=torch.long)
            for row, e in enumerate(examples):
                targets[row, : len(e.target_ids)] = torch.tensor(e.target_ids)
            batch["target_ids"] = targets
        return batch


class TaskBatches(Dataset):
    """Indexed by ``(task, indices)`` (what ``TaskBatchSampler`` yields): the collated batch.

    ``keyed`` wraps it as ``{task: batch}`` (a task-sampler step); per-task loaders inside a
    ``CombinedLoader`` leave it bare, and the ``CombinedLoader`` adds the task key.
    """

    def __init__(self, datasets: dict[str, TaskDataset], keyed: bool) -> None:
        self.datasets = datasets
        self.keyed = keyed

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets.values())

    def __getitem__(self, item: tuple[str, tuple[int, ...]]):
        task, indices = item
        batch = self.datasets[task].collate(indices)
        return {task: batch} if self.keyed else batch


def bucketed_batches(
    lengths: list[int], batch_size: int, bucket_size: int, generator: torch.Generator | None
) -> list[list[int]]:
    """Batches of similar lengths: shuffle (if ``generator``), sort within pools, cut, shuffle batches.

    Without a generator (evaluation) the whole set is sorted by length. ``bucket_size`` is the
    pool size in batches; 0 turns bucketing off.
    """
    n = len(lengths)
    order = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
    if generator is None and bucket_size:
        order = sorted(order, key=lambda i: lengths[i])
    elif bucket_size:
        pool = batch_size * bucket_size
        order = [
            i
            for start in range(0, n, pool)
            for i in sorted(order[start : start + pool], key=lengths.__getitem__)
        ]
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if generator is not None and bucket_size:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class TaskBatchSampler(Sampler):
    """Yields ``(task, indices)`` batches under a policy; the plan is a function of (seed, epoch).

    ``policy``: ``sequential`` (task after task), ``round_robin`` (tasks take turns; exhausted tasks
    drop out), ``proportional`` (a uniform shuffle of all tasks' batches, so each task is drawn in
    proportion to its size). Under ``torch.distributed`` each rank takes every world-size-th batch
    of the same plan (truncated to equal counts), so ranks never share a batch. Lightning calls
    ``set_epoch`` (it finds this sampler as ``DataLoader.sampler``) for a new plan every epoch.
    """

    POLICIES = ("sequential", "round_robin", "proportional")

    def __init__(
        self,
        lengths: dict[str, list[int]],
        batch_size: int | dict[str, int],
        policy: str = "sequential",
        shuffle: bool = True,
        bucket_size: int = 50,
        seed: int = 0,
    ) -> None:
        if policy not in self.POLICIES:
            raise ValueError(
                f"unknown task sampling policy {policy!r}; expected one of {', '.join(self.POLICIES)}"
            )
        sizes = batch_size if isinstance(batch_size, dict) else dict.fromkeys(lengths, batch_size)
        for task in lengths:
            if sizes.get(task, 0) < 1:
                raise ValueError(f"task {task!r}: batch size must be >= 1, got {sizes.get(task)}")
        self.lengths, self.batch_sizes, self.policy = lengths, sizes, policy
        self.shuffle, self.bucket_size, self.seed = shuffle, bucket_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self) -> list[tuple[str, tuple[int, ...]]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch) if self.shuffle else None
        per_task = {
            task: [
                (task, tuple(b))
                for b in bucketed_batches(lengths, self.batch_sizes[task], self.bucket_size, generator)
            ]
            for task, lengths in self.lengths.items()
        }
        if self.policy == "sequential":
            batches = [b for task_batches in per_task.values() for b in task_batches]
        elif self.policy == "round_robin":
            longest = max(len(b) for b in per_task.values())
            batches = [tb[i] for i in range(longest) for tb in per_task.values() if i < len(tb)]
        else:
            batches = [b for task_batches in per_task.values() for b in task_batches]
            order = (
                torch.randperm(len(batches), generator=generator).tolist() if generator is not None else None
            )
            batches = [batches[i] for i in order] if order is not None else batches
        rank, world = _rank_and_world()
        if world > 1:
            keep = len(batches) // world * world
            batches = batches[:keep][rank::world]
        return batches

    def __iter__(self):
        # a generator: the plan is drawn at the first ``next``, so a ``set_epoch`` that Lightning
        # calls after creating the iterator (as it does when resuming) still decides the order
        yield from self.plan()

    def __len__(self) -> int:
        return len(self.plan())


# ---------------------------------------------------------------------------------- embedded data
def arithmetic_examples(
    spec: TaskSpec,
    vocab: Vocabulary,
    count: int,
    seed: int,
    min_operands: int = 2,
    max_operands: int = 3,
    max_products: int = 1,
    exclude: set[str] | frozenset[str] = frozenset(),
) -> tuple[list[Example], set[str]]:
    """``count`` examples of one embedded task (texts in ``exclude`` are skipped) and their texts."""
    reference = ARITHMETIC_TASKS.get(spec.name)
    if reference is None:
        raise ValueError(
            f"task {spec.name!r} is not an embedded arithmetic task ({', '.join(ARITHMETIC_TASKS)}); "
            "point data_dir at JSONL files for other tasks"
        )
    if (spec.type, spec.num_classes) != (reference.type, reference.num_classes):
        raise ValueError(
            f"task {spec.name!r}: the embedded task is {reference.type} with num_classes={reference.num_classes}, "
            f"the YAML declares {spec.type} with num_classes={spec.num_classes}"
        )
    rng = random.Random(f"{spec.name}:{seed}")
    examples, texts = [], set()
    attempts = 0
    while len(examples) < count:
        attempts += 1
        if attempts > 50 * count + 1000:
            raise ValueError(
                f"task {spec.name!r}: could not draw {count} distinct expressions with "
                f"{min_operands}-{max_operands} operands (the space is too small); lower the set size"
            )
        text = random_expression(rng, min_operands, max_operands, max_products=max_products)
        if spec.type == SEQUENCE_CLASSIFICATION and rng.random() < 0.5:
            text = corrupt(rng, text)
        if text in exclude or text in texts:
            continue
        texts.add(text)
        ids = vocab.encode(text)
        if spec.type == SEQUENCE_CLASSIFICATION:
            examples.append(Example(ids, int(is_well_formed(text))))
        elif spec.type == TOKEN_CLASSIFICATION:
            examples.append(Example(ids, list(parse(text).tags)))
        elif spec.type == REGRESSION:
            examples.append(Example(ids, [parse(text).value / REGRESSION_SCALE]))
        else:
            target = [*vocab.encode(str(parse(text).value)), EOS_ID]
            examples.append(Example(ids, target_ids=target))
    return examples, texts


# ------------------------------------------------------------------------------------------ JSONL
def _records(path: Path, spec: TaskSpec) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise FileNotFoundError(f"task {spec.name!r}: {path} does not exist")
    records = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}:{line_no}: task {spec.name!r}: not valid JSON ({error.msg})"
                ) from error
            if not isinstance(record, dict):
                raise ValueError(
                    f"{path}:{line_no}: task {spec.name!r}: expected a JSON object, got {type(record).__name__}"
                )
            records.append((line_no, record))
    if not records:
        raise ValueError(f"{path}: task {spec.name!r}: the file is empty (expected one JSON object per line)")
    return records


def _tokens(record: dict, where: str, tokenizer: str) -> list[str]:
    if "tokens" in record:
        tokens = record["tokens"]
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise ValueError(f"{where}: 'tokens' must be a list of strings")
    elif isinstance(record.get("text"), str):
        tokens = Vocabulary([], tokenizer).split(record["text"])
    else:
        raise ValueError(f"{where}: expected a 'text' string or a 'tokens' list")
    if not tokens:
        raise ValueError(f"{where}: the input is empty")
    return tokens


def read_task_jsonl(path: str | Path, spec: TaskSpec, tokenizer: str = "char") -> list[tuple[list[str], Any]]:
    """Validated ``(tokens, label)`` pairs of one task file; the label's form depends on the task type."""
    path = Path(path)
    out = []
    for line_no, record in _records(path, spec):
        where = f"{path}:{line_no}: task {spec.name!r}"
        tokens = _tokens(record, where, tokenizer)
        if spec.type == SEQUENCE_CLASSIFICATION:
            label = record.get("label")
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < spec.num_classes:
                raise ValueError(
                    f"{where}: label {label!r} is outside the declared classes 0..{spec.num_classes - 1} "
                    f"(num_classes={spec.num_classes})"
                )
        elif spec.type == TOKEN_CLASSIFICATION:
            label = record.get("tags")
            if not isinstance(label, list) or len(label) != len(tokens):
                raise ValueError(
                    f"{where}: 'tags' must be a list with one class per token ({len(tokens)} tokens)"
                )
            for position, tag in enumerate(label):
                if isinstance(tag, bool) or not isinstance(tag, int) or not 0 <= tag < spec.num_classes:
                    raise ValueError(
                        f"{where}: tag {tag!r} at token {position} is outside the declared classes "
                        f"0..{spec.num_classes - 1} (num_classes={spec.num_classes})"
                    )
        elif spec.type == REGRESSION:
            target = record.get("target")
            label = target if isinstance(target, list) else [target]
            if len(label) != spec.num_classes or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in label
            ):
                raise ValueError(
                    f"{where}: 'target' must be {spec.num_classes} finite number(s), got {target!r}"
                )
            label = [float(v) for v in label]
        else:
            label = record.get("target")
            if not isinstance(label, str) or not label:
                raise ValueError(f"{where}: 'target' must be a non-empty string")
            length = len(Vocabulary([], tokenizer).split(label)) + 1
            if length > spec.max_target_length:
                raise ValueError(
                    f"{where}: target has {length} tokens with <eos>, above max_target_length={spec.max_target_length}"
                )
        out.append((tokens, label))
    return out


def _encode(pairs, spec: TaskSpec, vocab: Vocabulary) -> list[Example]:
    examples = []
    for tokens, label in pairs:
        ids = vocab.encode(tokens)
        if spec.type == GENERATION:
            examples.append(Example(ids, target_ids=[*vocab.encode(label), EOS_ID]))
        else:
            examples.append(Example(ids, label))
    return examples


# ------------------------------------------------------------------------------------- DataModule
class MultitaskDataModule(SplitDataModule):
    """Batches ``{task: batch}`` for ``zoo.multitask.MultitaskModule``; ``tasks`` and ``vocab_size`` link into it.

    Args:
        tasks: task declarations; ``None`` is the embedded wellformed / roles / value tasks.
        data_dir: JSONL folder (see the module docstring); ``None`` uses the embedded tasks.
        tokenizer: ``char`` or ``whitespace``, for JSONL ``text`` fields.
        mode: ``max_size_cycle`` | ``min_size`` | ``max_size`` (``CombinedLoader``: a batch of every
            task per step) or ``round_robin`` | ``proportional`` (one task per step).
        task_batch_sizes: per-task training batch sizes overriding ``batch_size`` (e.g. smaller
            batches for tasks that learn quickly; under ``min_size`` the task with the fewest
            batches sets the epoch, the others see a fresh random part of their data each epoch).
        bucket_size: pool size, in batches, of length bucketing (0: off).
        train_size / val_size / test_size: examples per embedded task and split.
        min_operands / max_operands / max_products: size of the embedded expressions (operands,
            ``*`` operators); the defaults keep values within -81..162.
    """

    #: data attribute -> model argument, fed by ``zoo fit`` into models that take the argument
    model_links: ClassVar[dict[str, str]] = {"tasks": "tasks", "vocab_size": "vocab_size"}

    def __init__(
        self,
        tasks: list[TaskSpec] | None = None,
        data_dir: str | None = None,
        tokenizer: str = "char",
        mode: str = "max_size_cycle",
        batch_size: int = 64,
        task_batch_sizes: dict[str, int] | None = None,
        eval_batch_size: int | None = None,
        bucket_size: int = 50,
        train_size: int = 8000,
        val_size: int = 500,
        test_size: int = 500,
        min_operands: int = 2,
        max_operands: int = 3,
        max_products: int = 1,
        held_out: bool = True,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["tasks"])
        if mode not in COMBINED_MODES + SAMPLER_MODES:
            raise ValueError(
                f"unknown mode {mode!r}; expected one of {', '.join(COMBINED_MODES + SAMPLER_MODES)}"
            )
        specs = validate_tasks(tasks) if tasks is not None else [ARITHMETIC_TASKS[n] for n in DEFAULT_TASKS]
        if data_dir is None:
            for spec in specs:  # fail at construction, not at setup
                if spec.name not in ARITHMETIC_TASKS:
                    raise ValueError(
                        f"task {spec.name!r} is not an embedded arithmetic task ({', '.join(ARITHMETIC_TASKS)}); "
                        "set data_dir to a folder of JSONL files for other tasks"
                    )
        elif not Path(data_dir).is_dir():
            raise FileNotFoundError(f"data_dir {data_dir!r} is not a directory")
        if not 1 <= min_operands <= max_operands:
            raise ValueError(f"need 1 <= min_operands <= max_operands, got {min_operands}, {max_operands}")
        self.tasks = specs
        unknown = set(task_batch_sizes or {}) - {t.name for t in specs}
        if unknown:
            raise ValueError(
                f"task_batch_sizes names undeclared task(s) {sorted(unknown)}; the declared tasks are "
                f"{', '.join(t.name for t in specs)} (override task_batch_sizes along with tasks)"
            )
        self.hparams["tasks"] = [asdict(t) for t in specs]  # plain dicts: checkpoints load weights-only
        self._vocabulary: Vocabulary | None = None
        self._pairs: dict[str, dict[str, list]] | None = None
        self.datasets: dict[str, dict[str, TaskDataset]] = {}

    # -- what the model needs to know, before setup
    @property
    def vocabulary(self) -> Vocabulary:
        if self._vocabulary is None:
            if self.hparams.data_dir is None:
                self._vocabulary = Vocabulary(ALPHABET, "char")
            else:
                pairs = self._read_jsonl()
                texts = []
                for task_pairs in pairs.values():
                    for split_pairs in task_pairs.values():
                        for tokens, label in split_pairs:
                            texts.extend(tokens)
                            if isinstance(label, str):
                                texts.extend(Vocabulary([], self.hparams.tokenizer).split(label))
                self._vocabulary = Vocabulary(sorted(set(texts)), self.hparams.tokenizer)
        return self._vocabulary

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)

    def _read_jsonl(self) -> dict[str, dict[str, list]]:
        if self._pairs is None:
            root = Path(self.hparams.data_dir)
            self._pairs = {}
            for spec in self.tasks:
                folder = root / spec.name
                splits = {"train": folder / "train.jsonl", "val": folder / "val.jsonl"}
                if (folder / "test.jsonl").is_file():
                    splits["test"] = folder / "test.jsonl"
                self._pairs[spec.name] = {
                    split: read_task_jsonl(path, spec, self.hparams.tokenizer)
                    for split, path in splits.items()
                }
        return self._pairs

    def setup(self, stage: str | None = None) -> None:
        if stage == "fit" and self.hparams.mode == "sequential":
            self._reject_sequential()
        if self.datasets:
            return
        hp = self.hparams
        vocab = self.vocabulary
        splits: dict[str, dict[str, TaskDataset]] = {"train": {}, "val": {}, "test": {}}
        for spec in self.tasks:
            if hp.data_dir is None:
                ops = (hp.min_operands, hp.max_operands, hp.max_products)
                train, seen = arithmetic_examples(spec, vocab, hp.train_size, hp.seed, *ops)
                seen = seen if hp.held_out else set()
                val, val_texts = arithmetic_examples(
                    spec, vocab, hp.val_size, hp.seed + 1, *ops, exclude=seen
                )
                test, _ = arithmetic_examples(
                    spec, vocab, hp.test_size, hp.seed + 2, *ops, exclude=seen | val_texts
                )
                parts = {"train": train, "val": val, "test": test}
            else:
                pairs = self._read_jsonl()[spec.name]
                parts = {split: _encode(p, spec, vocab) for split, p in pairs.items()}
                parts.setdefault("test", parts["val"])
            for split, examples in parts.items():
                splits[split][spec.name] = TaskDataset(spec, examples)
        self.datasets = splits

    def _reject_sequential(self) -> None:
        raise ValueError(
            "mode='sequential' cannot be used to fit: CombinedLoader's sequential mode serves one task's "
            "loader after another with no batch holding several tasks, and Lightning's fit loop does not "
            "support it. Use max_size_cycle, min_size or max_size (a batch of every task per step) or "
            "round_robin / proportional (one task per step)."
        )

    def _task_loader(
        self, datasets: dict[str, TaskDataset], policy: str, shuffle: bool, keyed: bool
    ) -> DataLoader:
        hp = self.hparams
        if shuffle:
            batch_size = {name: (hp.task_batch_sizes or {}).get(name, hp.batch_size) for name in datasets}
        else:
            batch_size = hp.eval_batch_size or hp.batch_size
        sampler = TaskBatchSampler(
            {name: d.lengths for name, d in datasets.items()},
            batch_size,
            policy,
            shuffle,
            hp.bucket_size,
            hp.seed,
        )
        return DataLoader(
            TaskBatches(datasets, keyed=keyed),
            batch_size=None,
            sampler=sampler,
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
        )

    def train_dataloader(self):
        mode = self.hparams.mode
        if mode == "sequential":
            self._reject_sequential()
        datasets = self.datasets["train"]
        if mode in SAMPLER_MODES:
            return self._task_loader(datasets, mode, shuffle=True, keyed=True)
        loaders = {
            name: self._task_loader({name: d}, "sequential", True, keyed=False)
            for name, d in datasets.items()
        }
        return CombinedLoader(loaders, mode=mode)

    def _eval_loader(self, split: str) -> DataLoader:
        return self._task_loader(self.datasets[split], "sequential", shuffle=False, keyed=True)

    def val_dataloader(self):
        return self._eval_loader("val")

    def test_dataloader(self):
        return self._eval_loader("test")

    def predict_dataloader(self):
        return self._eval_loader("test")
