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

Batches are planned by ``TaskBatchSampler`` from ``(seed, epoch)``, and shared out between DDP ranks
by its base ``EpochPlanBatchSampler`` from the ``DistributedSampler`` Lightning injects.

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

``predict`` runs every task on each expression of ``predict_path`` (a text file, one expression a
line), or by default on the test split's expressions. ``zoo serve`` reads one expression a request
(``MultitaskRequestCodec``: ``{"text": "(1+2)*3", "id": optional}``), checked and tokenized as
``predict_path`` lines are, into the same batches.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset, Sampler

from zoo.base import IGNORE_INDEX
from zoo.datamodules.epoch_plans import EpochPlanBatchSampler, one_process_sampler, padded_to_multiple
from zoo.datamodules.splits import SplitDataModule
from zoo.errors import MissingFileError, ZooError
from zoo.multitask.arithmetic import (
    ALPHABET,
    ARITHMETIC_TASKS,
    DEFAULT_TASKS,
    REGRESSION_SCALE,
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
from zoo.multitask.vocab import EOS_ID, PAD_ID, SPECIAL_TOKENS, Vocabulary
from zoo.resume import ResumableDataLoader
from zoo.serving import RequestCodec, RequestError, text_field

__all__ = [
    "ARITHMETIC_TASKS",
    "MultitaskDataModule",
    "MultitaskRequestCodec",
    "PredictTexts",
    "TaskBatchSampler",
    "TaskDataset",
    "arithmetic_examples",
    "predict_batch",
    "read_expressions",
    "read_task_jsonl",
    "vocabulary_error",
]

COMBINED_MODES = ("max_size_cycle", "min_size", "max_size", "sequential")
SAMPLER_MODES = ("round_robin", "proportional")


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
    """Every task's examples in one index space, task after task; ``collate`` makes one task's batch.

    An item is ``(task, index in the task)``; a batch (``TaskBatchSampler`` keeps each to one task) is
    collated by that task's ``TaskDataset``. ``keyed`` wraps it as ``{task: batch}`` (a task-sampler step,
    evaluation); per-task loaders inside a ``CombinedLoader`` leave it bare, and the ``CombinedLoader``
    adds the task key.
    """

    def __init__(self, datasets: dict[str, TaskDataset], keyed: bool) -> None:
        self.datasets = datasets
        self.keyed = keyed
        self.tasks = list(datasets)
        self.starts = list(itertools.accumulate((len(d) for d in datasets.values()), initial=0))

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: int) -> tuple[str, int]:
        position = bisect.bisect_right(self.starts, index) - 1
        return self.tasks[position], index - self.starts[position]

    def collate(self, items: list[tuple[str, int]]):
        task = items[0][0]
        if any(t != task for t, _ in items):
            raise ZooError(f"a batch mixes tasks {sorted({t for t, _ in items})}; each batch holds one task")
        batch = self.datasets[task].collate([i for _, i in items])
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


class TaskBatchSampler(EpochPlanBatchSampler):
    """Batches of one task each under a policy; the plan is a function of (seed, epoch).

    ``policy``: ``sequential`` (task after task), ``round_robin`` (tasks take turns; exhausted tasks
    drop out), ``proportional`` (a uniform shuffle of all tasks' batches, so each task is drawn in
    proportion to its size). Batches hold indices of ``TaskBatches`` (the tasks of ``lengths``, in
    order, in one index space). ``EpochPlanBatchSampler`` reads the epoch from ``sampler`` (Lightning
    calls its ``set_epoch``) and, under DDP, the rank and world size.

    Under DDP every rank runs a batch of the same task at each step, so the same heads, metric groups
    and logged names take part in each step's collectives: the plan is laid out in runs of world-size
    batches of one task (each task's batches padded with its first ones to a multiple of the world
    size), and rank ``r`` takes the ``r``-th batch of every run. In one process that is the plain plan.
    """

    POLICIES = ("sequential", "round_robin", "proportional")

    def __init__(
        self,
        sampler: Sampler,
        lengths: dict[str, list[int]],
        batch_size: int | dict[str, int],
        policy: str = "sequential",
        shuffle: bool = True,
        bucket_size: int = 50,
        seed: int = 0,
    ) -> None:
        if policy not in self.POLICIES:
            raise ZooError(
                f"unknown task sampling policy {policy!r}; expected one of {', '.join(self.POLICIES)}"
            )
        sizes = batch_size if isinstance(batch_size, dict) else dict.fromkeys(lengths, batch_size)
        for task in lengths:
            if sizes.get(task, 0) < 1:
                raise ZooError(f"task {task!r}: batch size must be >= 1, got {sizes.get(task)}")
        self.sampler = sampler
        self.lengths, self.batch_sizes, self.policy = lengths, sizes, policy
        self.shuffle, self.bucket_size, self.seed = shuffle, bucket_size, seed
        starts = itertools.accumulate((len(task_lengths) for task_lengths in lengths.values()), initial=0)
        self.starts = dict(zip(lengths, starts))

    def task_batches(self, epoch: int, world: int = 1) -> list[tuple[str, list[int]]]:
        """The epoch's ``(task, indices within the task)`` batches in the policy's order, in runs of ``world``."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch) if self.shuffle else None
        runs = {}
        for task, lengths in self.lengths.items():
            batches = bucketed_batches(lengths, self.batch_sizes[task], self.bucket_size, generator)
            batches = padded_to_multiple(batches, world)
            runs[task] = [[(task, b) for b in batches[i : i + world]] for i in range(0, len(batches), world)]
        if self.policy == "round_robin":
            longest = max(len(task_runs) for task_runs in runs.values())
            ordered = [
                task_runs[i] for i in range(longest) for task_runs in runs.values() if i < len(task_runs)
            ]
        else:
            ordered = [run for task_runs in runs.values() for run in task_runs]
            if self.policy == "proportional" and generator is not None:
                ordered = [ordered[i] for i in torch.randperm(len(ordered), generator=generator).tolist()]
        return [batch for run in ordered for batch in run]

    def rank_batches(self, epoch: int, world: int) -> list[list[int]]:
        return [[self.starts[task] + i for i in indices] for task, indices in self.task_batches(epoch, world)]

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        return self.rank_batches(epoch, world=1)

    def num_rank_batches(self, world: int) -> int:
        return sum(
            -(-math.ceil(len(lengths) / self.batch_sizes[task]) // world)
            for task, lengths in self.lengths.items()
        )

    def num_epoch_batches(self) -> int:
        return self.num_rank_batches(world=1)


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
        raise ZooError(
            f"task {spec.name!r} is not an embedded arithmetic task ({', '.join(ARITHMETIC_TASKS)}); "
            "point data_dir at JSONL files for other tasks"
        )
    if (spec.type, spec.num_classes) != (reference.type, reference.num_classes):
        raise ZooError(
            f"task {spec.name!r}: the embedded task is {reference.type} with num_classes={reference.num_classes}, "
            f"the YAML declares {spec.type} with num_classes={spec.num_classes}"
        )
    rng = random.Random(f"{spec.name}:{seed}")
    examples, texts = [], set()
    attempts = 0
    while len(examples) < count:
        attempts += 1
        if attempts > 50 * count + 1000:
            raise ZooError(
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


def with_embedded_label_names(spec: TaskSpec) -> TaskSpec:
    """``spec`` naming its classes as the embedded task does (which predictions report), when it declares
    the embedded task's classes and names none itself."""
    reference = ARITHMETIC_TASKS[spec.name]
    same_classes = (spec.type, spec.num_classes) == (reference.type, reference.num_classes)
    if spec.label_names is not None or not same_classes:
        return spec
    return replace(spec, label_names=reference.label_names)


# ------------------------------------------------------------------------------------------ JSONL
def _records(path: Path, spec: TaskSpec) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise MissingFileError(f"task {spec.name!r}: {path} does not exist")
    records = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ZooError(
                    f"{path}:{line_no}: task {spec.name!r}: not valid JSON ({error.msg})"
                ) from error
            if not isinstance(record, dict):
                raise ZooError(
                    f"{path}:{line_no}: task {spec.name!r}: expected a JSON object, got {type(record).__name__}"
                )
            records.append((line_no, record))
    if not records:
        raise ZooError(f"{path}: task {spec.name!r}: the file is empty (expected one JSON object per line)")
    return records


def _tokens(record: dict, where: str, tokenizer: str) -> list[str]:
    if "tokens" in record:
        tokens = record["tokens"]
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise ZooError(f"{where}: 'tokens' must be a list of strings")
    elif isinstance(record.get("text"), str):
        tokens = Vocabulary([], tokenizer).split(record["text"])
    else:
        raise ZooError(f"{where}: expected a 'text' string or a 'tokens' list")
    if not tokens:
        raise ZooError(f"{where}: the input is empty")
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
                raise ZooError(
                    f"{where}: label {label!r} is outside the declared classes 0..{spec.num_classes - 1} "
                    f"(num_classes={spec.num_classes})"
                )
        elif spec.type == TOKEN_CLASSIFICATION:
            label = record.get("tags")
            if not isinstance(label, list) or len(label) != len(tokens):
                raise ZooError(
                    f"{where}: 'tags' must be a list with one class per token ({len(tokens)} tokens)"
                )
            for position, tag in enumerate(label):
                if isinstance(tag, bool) or not isinstance(tag, int) or not 0 <= tag < spec.num_classes:
                    raise ZooError(
                        f"{where}: tag {tag!r} at token {position} is outside the declared classes "
                        f"0..{spec.num_classes - 1} (num_classes={spec.num_classes})"
                    )
        elif spec.type == REGRESSION:
            target = record.get("target")
            label = target if isinstance(target, list) else [target]
            if len(label) != spec.num_classes or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in label
            ):
                raise ZooError(
                    f"{where}: 'target' must be {spec.num_classes} finite number(s), got {target!r}"
                )
            label = [float(v) for v in label]
        else:
            label = record.get("target")
            if not isinstance(label, str) or not label:
                raise ZooError(f"{where}: 'target' must be a non-empty string")
            length = len(Vocabulary([], tokenizer).split(label)) + 1
            if length > spec.max_target_length:
                raise ZooError(
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


# ---------------------------------------------------------------------------------------- predict
def vocabulary_error(text: str, vocab: Vocabulary) -> str | None:
    """What keeps ``text`` from being read with ``vocab`` (its first token outside it, with the position), or
    ``None``. Special tokens written out (``<pad>``) are outside too: the model never reads them as text."""
    kind = "character" if vocab.tokenizer == "char" else "token"
    for position, token in enumerate(vocab.split(text)):
        if token not in vocab.stoi or vocab.stoi[token] < len(SPECIAL_TOKENS):
            tokens = vocab.itos[len(SPECIAL_TOKENS) :]
            known = (
                repr("".join(tokens))
                if kind == "character"
                else f"of {len(tokens)} tokens read from the data"
            )
            return f"{kind} {token!r} at position {position} is outside the vocabulary {known}"
    return None


def read_expressions(path: str | Path, vocab: Vocabulary) -> list[str]:
    """The expressions of a text file, one a line (blank lines skipped), every token in ``vocab``."""
    path = Path(path)
    texts = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            text = line.strip()
            if not text:
                continue
            problem = vocabulary_error(text, vocab)
            if problem is not None:
                raise ZooError(f"{path}:{line_no}: {problem}")
            texts.append(text)
    if not texts:
        raise ZooError(f"{path}: the file holds no expression (expected one a line)")
    return texts


def predict_batch(texts: list[str], ids: list[list[int]], names: list[str] | None = None) -> dict[str, Any]:
    """``{"text", "id", "input_ids", "padding_mask"}``: the texts, their names (default: the texts), their ids
    padded to the longest. The one predict batch format, of ``zoo predict`` and ``zoo serve`` alike."""
    width = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), width), PAD_ID, dtype=torch.long)
    for row, row_ids in enumerate(ids):
        input_ids[row, : len(row_ids)] = torch.tensor(row_ids)
    return {
        "text": list(texts),
        "id": list(texts) if names is None else list(names),
        "input_ids": input_ids,
        "padding_mask": input_ids.ne(PAD_ID),
    }


class PredictTexts(Dataset):
    """Expressions to predict on; ``collate`` pads some into ``predict_batch``'s format (named by their text)."""

    def __init__(self, texts: list[str], vocab: Vocabulary) -> None:
        self.texts = texts
        self.ids = [vocab.encode(text) for text in texts]

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> tuple[str, list[int]]:
        return self.texts[index], self.ids[index]

    @staticmethod
    def collate(items: list[tuple[str, list[int]]]) -> dict[str, Any]:
        return predict_batch([text for text, _ in items], [ids for _, ids in items])


class MultitaskRequestCodec(RequestCodec):
    """``zoo serve`` requests for a multitask model: ``{"text": "(1+2)*3", "id": optional}``; every task runs
    on the text, as ``zoo predict`` runs them on a line of ``predict_path``.

    The text is checked as those lines are (a token outside the data's vocabulary is named with its position;
    nothing is mapped to ``<unk>``), and against ``max_length`` tokens, so one request cannot make a batch
    arbitrarily long. Batches are ``predict_batch``'s, the predict loader's format.
    """

    fields = {"text": "the input, written in the data's vocabulary (for the embedded tasks an expression "
                      "such as '(1+2)*3')",
              "id": "optional name, echoed in the answer (default: the text)"}  # fmt: skip
    text_fields = ("text", "id")

    def __init__(self, vocabulary: Vocabulary, max_length: int) -> None:
        self.vocabulary = vocabulary
        self.max_length = max_length

    def parse(self, payload) -> dict[str, Any]:
        payload = self.check_keys(payload)
        text = text_field(payload, "text")
        tokens = self.vocabulary.split(text)
        unit = "characters" if self.vocabulary.tokenizer == "char" else "tokens"
        if not tokens:
            raise RequestError("text", "holds no token (only whitespace)")
        if len(tokens) > self.max_length:
            raise RequestError(
                "text",
                f"{len(tokens)} {unit}, more than the limit of {self.max_length} "
                "(the data module's max_request_length)",
            )
        problem = vocabulary_error(text, self.vocabulary)
        if problem is not None:
            raise RequestError("text", problem)
        name = text_field(payload, "id", required=False, max_length=1000)
        return {
            "text": text,
            "id": text if name is None else name,
            "input_ids": self.vocabulary.encode(tokens),
        }

    def collate(self, items) -> dict[str, Any]:
        return predict_batch(
            [item["text"] for item in items],
            [item["input_ids"] for item in items],
            [item["id"] for item in items],
        )


# ------------------------------------------------------------------------------------- DataModule
class MultitaskDataModule(SplitDataModule):
    """Batches ``{task: batch}`` for ``zoo.multitask.MultitaskModule``; tasks and vocabulary link into it.

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
        predict_path: a text file of expressions to predict on, one a line, written in the vocabulary
            (a character outside it fails naming the file and line); ``None``: the test split's expressions.
        max_request_length: the longest text ``zoo serve`` accepts, in tokens (characters for the ``char``
            tokenizer); a longer request is refused naming this limit.
    """

    #: data attribute -> model argument, fed by ``zoo fit`` into models that take the argument
    model_links: ClassVar[dict[str, str]] = {
        "task_declarations": "tasks",
        "vocab_size": "vocab_size",
        "vocab_tokens": "vocab_tokens",
        "tokenizer": "tokenizer",
    }

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
        predict_path: str | None = None,
        max_request_length: int = 256,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["tasks"])
        if mode not in COMBINED_MODES + SAMPLER_MODES:
            raise ZooError(
                f"unknown mode {mode!r}; expected one of {', '.join(COMBINED_MODES + SAMPLER_MODES)}"
            )
        specs = validate_tasks(tasks) if tasks is not None else [ARITHMETIC_TASKS[n] for n in DEFAULT_TASKS]
        if data_dir is None:
            for spec in specs:  # fail at construction, not at setup
                if spec.name not in ARITHMETIC_TASKS:
                    raise ZooError(
                        f"task {spec.name!r} is not an embedded arithmetic task ({', '.join(ARITHMETIC_TASKS)}); "
                        "set data_dir to a folder of JSONL files for other tasks"
                    )
            specs = [with_embedded_label_names(spec) for spec in specs]
        elif not Path(data_dir).is_dir():
            raise MissingFileError(f"data_dir {data_dir!r} is not a directory")
        if predict_path is not None and not Path(predict_path).is_file():
            raise MissingFileError(f"predict_path {predict_path!r} is not a file")
        if max_request_length < 1:
            raise ZooError(f"max_request_length must be >= 1, got {max_request_length}")
        if not 1 <= min_operands <= max_operands:
            raise ZooError(f"need 1 <= min_operands <= max_operands, got {min_operands}, {max_operands}")
        self.tasks = specs
        unknown = set(task_batch_sizes or {}) - {t.name for t in specs}
        if unknown:
            raise ZooError(
                f"task_batch_sizes names undeclared task(s) {sorted(unknown)}; the declared tasks are "
                f"{', '.join(t.name for t in specs)} (override task_batch_sizes along with tasks)"
            )
        self.hparams["tasks"] = self.task_declarations  # plain dicts: checkpoints load weights-only
        self._vocabulary: Vocabulary | None = None
        self._pairs: dict[str, dict[str, list]] | None = None
        self.datasets: dict[str, dict[str, TaskDataset]] = {}
        self.predict_set: PredictTexts | None = None

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

    @property
    def task_declarations(self) -> list[dict[str, Any]]:
        """The tasks as plain dicts, as YAML declares them: what the model gets (and config.yaml records)."""
        return [asdict(spec) for spec in self.tasks]

    @property
    def vocab_tokens(self) -> list[str]:
        """The vocabulary's tokens by id: the model decodes generated ids with them."""
        return list(self.vocabulary.itos)

    @property
    def tokenizer(self) -> str:
        return self.hparams.tokenizer

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
        if stage == "predict":  # the splits only when predicting on the test split (see predict_dataloader)
            if self.hparams.predict_path is not None and self.predict_set is None:
                self.predict_set = PredictTexts(
                    read_expressions(self.hparams.predict_path, self.vocabulary), self.vocabulary
                )
            return
        if not self.datasets:
            self.datasets = self._task_splits()
        if stage is None and self.predict_set is None:
            self.predict_set = PredictTexts(self._predict_texts(), self.vocabulary)

    def _predict_texts(self) -> list[str]:
        """The expressions of ``predict_path``, else every distinct test expression (task after task)."""
        if self.hparams.predict_path is not None:
            return read_expressions(self.hparams.predict_path, self.vocabulary)
        texts = (
            self.vocabulary.decode(example.input_ids)
            for dataset in self.datasets["test"].values()
            for example in dataset.examples
        )
        return list(dict.fromkeys(texts))

    def _task_splits(self) -> dict[str, dict[str, TaskDataset]]:
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
        return splits

    def _reject_sequential(self) -> None:
        raise ZooError(
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
        batches = TaskBatches(datasets, keyed=keyed)
        sampler = TaskBatchSampler(
            one_process_sampler(batches),
            {name: d.lengths for name, d in datasets.items()},
            batch_size,
            policy,
            shuffle,
            hp.bucket_size,
            hp.seed,
        )
        return ResumableDataLoader(
            batches,
            batch_sampler=sampler,
            collate_fn=batches.collate,
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

    def request_codec(self) -> MultitaskRequestCodec:
        """What ``zoo serve`` reads: one text a request, checked and tokenized as ``predict_path`` lines are."""
        return MultitaskRequestCodec(self.vocabulary, self.hparams.max_request_length)

    def predict_dataloader(self):
        """Expressions in file order, ``{"text", "id", "input_ids", "padding_mask"}``: every task runs on each.

        Without ``predict_path``, the test split's expressions: the data is generated (or read) here, on first
        use, not in ``setup("predict")``, so a server, which needs only the vocabulary, starts without it.
        """
        hp = self.hparams
        if self.predict_set is None:
            if not self.datasets:
                self.datasets = self._task_splits()
            self.predict_set = PredictTexts(self._predict_texts(), self.vocabulary)
        return DataLoader(
            self.predict_set,
            batch_size=hp.eval_batch_size or hp.batch_size,
            collate_fn=PredictTexts.collate,
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
        )
