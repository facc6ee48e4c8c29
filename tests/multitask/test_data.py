"""Embedded arithmetic tasks, JSONL input with line-level errors, combined loaders, task sampling and
the expressions to predict on."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from torch.utils.data import DistributedSampler

from zoo.datamodules.epoch_plans import one_process_sampler
from zoo.datamodules.multitask import (
    ARITHMETIC_TASKS,
    MultitaskDataModule,
    TaskBatchSampler,
    bucketed_batches,
    read_task_jsonl,
)
from zoo.multitask import TaskSpec
from zoo.multitask.arithmetic import ROLE_TAGS, ExpressionError, parse
from zoo.multitask.vocab import EOS_ID, PAD_ID

ALL_TASKS = list(ARITHMETIC_TASKS.values())


def small(**kwargs) -> MultitaskDataModule:
    kwargs = {
        "tasks": ALL_TASKS,
        "train_size": 96,
        "val_size": 40,
        "test_size": 40,
        "batch_size": 16,
        **kwargs,
    }
    dm = MultitaskDataModule(**kwargs)
    dm.setup("fit")
    return dm


def test_parser_labels_value_and_roles():
    parsed = parse("(3+4)*2-5")
    assert parsed.value == 9
    assert [ROLE_TAGS[t] for t in parsed.tags] == [
        "open", "term", "plus", "term", "close", "times", "factor", "minus", "term"
    ]  # fmt: skip
    assert parse("7").tags == (0,)
    for bad in ("3+", "(3", "3)", "34", "+3", "", "3**4"):
        with pytest.raises(ExpressionError):
            parse(bad)


def test_embedded_tasks_are_deterministic_labelled_and_held_out():
    a, b = small(), small()
    for name in ARITHMETIC_TASKS:
        assert [e.input_ids for e in a.datasets["train"][name].examples] == [
            e.input_ids for e in b.datasets["train"][name].examples
        ]
        train = {tuple(e.input_ids) for e in a.datasets["train"][name].examples}
        held_out = {tuple(e.input_ids) for s in ("val", "test") for e in a.datasets[s][name].examples}
        assert not train & held_out
    vocab = a.vocabulary
    for e in a.datasets["train"]["value"].examples[:20]:
        text = vocab.decode(e.input_ids)
        assert e.target_ids[-1] == EOS_ID and vocab.decode(e.target_ids) == str(eval(text))
    labels = Counter(e.label for e in a.datasets["train"]["wellformed"].examples)
    assert labels[0] > 20 and labels[1] > 20
    example = a.datasets["train"]["roles"].examples[0]
    assert len(example.label) == len(example.input_ids)


def test_collated_batches_have_padding_masks():
    dm = small(mode="max_size_cycle")
    loader = dm.train_dataloader()
    batch, _, _ = next(iter(loader))
    assert set(batch) == set(ARITHMETIC_TASKS)
    tags = batch["roles"]
    assert torch.equal(tags["padding_mask"], tags["input_ids"] != PAD_ID)
    assert ((tags["labels"] == -100) == ~tags["padding_mask"]).all()
    assert batch["value_regression"]["labels"].dtype == torch.float32
    assert batch["value"]["target_ids"].shape[0] == 16


@pytest.mark.parametrize(("mode", "steps"), [("max_size_cycle", 8), ("min_size", 3), ("max_size", 8)])
def test_combined_loader_modes(mode, steps):
    tasks = [
        TaskSpec("wellformed", "sequence_classification", num_classes=2),
        TaskSpec("roles", "token_classification", num_classes=7),
    ]
    dm = MultitaskDataModule(tasks=tasks, mode=mode, train_size=128, batch_size=16, val_size=8, test_size=8)
    dm.setup("fit")
    dm.datasets["train"]["roles"].examples = dm.datasets["train"]["roles"].examples[:48]  # 3 batches vs 8
    dm.datasets["train"]["roles"].lengths = dm.datasets["train"]["roles"].lengths[:48]
    batches = [b for b, _, _ in dm.train_dataloader()]
    assert len(batches) == steps
    missing = sum(b["roles"] is None for b in batches)
    assert missing == (5 if mode == "max_size" else 0)


def test_per_task_batch_sizes_under_min_size():
    tasks = [ARITHMETIC_TASKS["wellformed"], ARITHMETIC_TASKS["value"]]
    dm = MultitaskDataModule(
        tasks=tasks, mode="min_size", batch_size=32, task_batch_sizes={"wellformed": 8},
        train_size=128, val_size=8, test_size=8,
    )  # fmt: skip
    dm.setup("fit")
    batches = [b for b, _, _ in dm.train_dataloader()]
    assert len(batches) == 4  # value: 128 / 32 batches bound the epoch; wellformed has 16 of 8
    assert {len(b["wellformed"]["input_ids"]) for b in batches} == {8}
    assert {len(b["value"]["input_ids"]) for b in batches} == {32}
    with pytest.raises(ValueError, match=r"task_batch_sizes names undeclared task\(s\) \['roles'\]"):
        MultitaskDataModule(tasks=tasks, task_batch_sizes={"roles": 8})


def test_fit_rejects_the_sequential_mode_with_an_explanation():
    dm = MultitaskDataModule(mode="sequential", train_size=32, val_size=8, test_size=8)
    with pytest.raises(ValueError, match="mode='sequential' cannot be used to fit"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="unknown mode 'zip'"):
        MultitaskDataModule(mode="zip")


def task_sampler(lengths: dict[str, list[int]], *args, sampler=None, **kwargs) -> TaskBatchSampler:
    total = sum(len(task_lengths) for task_lengths in lengths.values())
    return TaskBatchSampler(sampler or one_process_sampler(range(total)), lengths, *args, **kwargs)


def test_task_sampler_round_robin_and_proportional():
    lengths = {"a": [3] * 64, "b": [3] * 16}  # 4 and 1 batches of 16
    rr = task_sampler(lengths, 16, "round_robin", seed=0)
    assert [t for t, _ in rr.task_batches(0)] == ["a", "b", "a", "a", "a"]
    assert [min(batch) // 64 for batch in rr] == [0, 1, 0, 0, 0]  # "b" follows "a" in one index space
    prop = task_sampler({"a": [3] * 800, "b": [3] * 160}, 16, "proportional", seed=0)
    counts = Counter(t for t, _ in prop.task_batches(0))
    assert counts == {"a": 50, "b": 10} and len(prop) == 60
    first = list(prop)
    prop.sampler.set_epoch(1)  # what Lightning calls every epoch
    assert list(prop) != first  # a new order every epoch, fixed by (seed, epoch)
    prop.sampler.set_epoch(0)
    assert list(prop) == first
    assert sorted(i for batch in prop for i in batch) == list(range(960))


def test_task_sampler_shares_out_one_plan_between_ranks():
    """Under DDP, Lightning gives the sampler a DistributedSampler: the ranks split one plan and run a batch
    of the same task at every step (so the same heads and logged names join each step's collectives)."""
    lengths = {"a": [3] * 64, "b": [3] * 40}  # 4 + 3 batches of 16: "b" is padded with its first batch
    samplers = [
        task_sampler(lengths, 16, "proportional", sampler=DistributedSampler(range(104), 2, rank))
        for rank in (0, 1)
    ]
    ranks = [list(sampler) for sampler in samplers]
    assert len(ranks[0]) == len(ranks[1]) == len(samplers[0]) == 4
    tasks = [["a" if batch[0] < 64 else "b" for batch in rank] for rank in ranks]
    assert tasks[0] == tasks[1]
    served, plan = ranks[0] + ranks[1], samplers[0].epoch_batches(0)  # the one-process plan
    assert all(batch in served for batch in plan) and len(served) == len(plan) + 1
    # more ranks than a task has batches: its batches repeat until every rank has one
    shares = [
        list(task_sampler({"a": [3] * 16}, 16, sampler=DistributedSampler(range(16), 4, r))) for r in range(4)
    ]
    assert [[sorted(batch) for batch in share] for share in shares] == [[list(range(16))]] * 4


def test_sampler_mode_serves_one_task_per_step():
    dm = small(mode="proportional")
    batches = list(dm.train_dataloader())
    assert all(len(b) == 1 for b in batches)
    assert Counter(next(iter(b)) for b in batches) == dict.fromkeys(ARITHMETIC_TASKS, 6)
    value = next(b["value"] for b in batches if "value" in b)
    assert value["input_ids"].shape[0] == 16 and "target_ids" in value


def test_predict_reads_one_expression_a_line(tmp_path):
    path = tmp_path / "expressions.txt"
    path.write_text("3+4*2\n\n(1+2)*3\n")
    dm = small(predict_path=str(path))
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["text"] == ["3+4*2", "(1+2)*3"]
    assert dm.vocabulary.decode(batch["input_ids"][1]) == "(1+2)*3"
    assert batch["padding_mask"].sum(1).tolist() == [5, 7]


def test_predict_defaults_to_the_test_expressions():
    dm = small(test_size=8, tasks=[ARITHMETIC_TASKS["wellformed"], ARITHMETIC_TASKS["value"]])
    dm.setup("predict")
    texts = [text for batch in dm.predict_dataloader() for text in batch["text"]]
    expected = [dm.vocabulary.decode(e.input_ids) for d in dm.datasets["test"].values() for e in d.examples]
    assert texts == list(dict.fromkeys(expected)) and len(texts) > 8


def test_a_character_outside_the_vocabulary_names_the_file_and_line(tmp_path):
    path = tmp_path / "expressions.txt"
    path.write_text("3+4\n2 / 5\n")
    dm = small(predict_path=str(path))
    with pytest.raises(
        ValueError,
        match=r"expressions.txt:2: character ' ' at position 1 is outside the vocabulary '0123456789\+-\*",
    ):
        dm.setup("predict")
    with pytest.raises(FileNotFoundError, match=r"predict_path 'missing\.txt' is not a file"):
        MultitaskDataModule(predict_path="missing.txt")


def test_length_bucketing_reduces_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 60, (2048,), generator=g).tolist()

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    plain = bucketed_batches(lengths, 32, 0, torch.Generator().manual_seed(1))
    bucketed = bucketed_batches(lengths, 32, 50, torch.Generator().manual_seed(1))
    assert sorted(i for b in bucketed for i in b) == list(range(2048))
    assert padding(bucketed) < 0.2 * padding(plain)


def write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


JSONL_TASKS = [
    TaskSpec("sentiment", "sequence_classification", num_classes=2),
    TaskSpec("pos", "token_classification", num_classes=3),
    TaskSpec("score", "regression"),
    TaskSpec("echo", "generation", max_target_length=6),
]


@pytest.fixture
def jsonl_dir(tmp_path):
    rows = {
        "sentiment": [{"text": "good film", "label": 1}, {"text": "bad film", "label": 0}],
        "pos": [{"tokens": ["a", "good", "film"], "tags": [0, 1, 2]}, {"text": "bad film", "tags": [1, 2]}],
        "score": [{"text": "good", "target": 0.9}, {"text": "bad", "target": -0.5}],
        "echo": [{"text": "good film", "target": "film good"}, {"text": "a film", "target": "film a"}],
    }
    for task, data in rows.items():
        write(tmp_path / task / "train.jsonl", data)
        write(tmp_path / task / "val.jsonl", data[:1])
    return tmp_path


def test_jsonl_tasks_load_with_one_shared_vocabulary(jsonl_dir):
    dm = MultitaskDataModule(tasks=JSONL_TASKS, data_dir=str(jsonl_dir), tokenizer="whitespace", batch_size=2)
    dm.setup("fit")
    assert dm.vocabulary.itos[4:] == ["a", "bad", "film", "good"]
    assert dm.vocab_size == 8
    echo = dm.datasets["train"]["echo"].examples[0]
    assert dm.vocabulary.decode(echo.target_ids) == "film good"
    assert len(dm.datasets["test"]["pos"]) == 1  # no test.jsonl: the validation file is used
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"sentiment"}


def test_predict_on_word_level_data_names_an_unknown_word(jsonl_dir, tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("good film\na great film\n")
    dm = MultitaskDataModule(
        tasks=JSONL_TASKS, data_dir=str(jsonl_dir), tokenizer="whitespace", predict_path=str(path)
    )
    with pytest.raises(
        ValueError, match=r"texts.txt:2: token 'great' at position 1 is outside the vocabulary of 4"
    ):
        dm.setup("predict")


@pytest.mark.parametrize(
    ("task", "rows", "message"),
    [
        (JSONL_TASKS[0], [{"text": "ok", "label": 1}, {"text": "x", "label": 2}],
         r"train.jsonl:2: task 'sentiment': label 2 is outside the declared classes 0..1"),
        (JSONL_TASKS[1], [{"text": "a b", "tags": [0, 7]}],
         r"train.jsonl:1: task 'pos': tag 7 at token 1 is outside the declared classes 0..2"),
        (JSONL_TASKS[1], [{"text": "a b", "tags": [0]}], r"train.jsonl:1: task 'pos': 'tags' must be a list"),
        (JSONL_TASKS[2], ["", {"text": "a", "target": "high"}], r"train.jsonl:2: task 'score': 'target' must be 1"),
        (JSONL_TASKS[3], [{"text": "a", "target": "a b c d e f"}], r"train.jsonl:1: task 'echo': target has 7 tokens"),
        (JSONL_TASKS[0], ['{"text": "a", "label": 1', ], r"train.jsonl:1: task 'sentiment': not valid JSON"),
        (JSONL_TASKS[0], [{"label": 1}], r"train.jsonl:1: task 'sentiment': expected a 'text' string"),
        (JSONL_TASKS[0], ["", "  "], r"train.jsonl: task 'sentiment': the file is empty"),
    ],
)  # fmt: skip
def test_bad_jsonl_names_the_file_line_and_task(tmp_path, task, rows, message):
    path = tmp_path / "train.jsonl"
    write(path, rows)
    with pytest.raises(ValueError, match=message):
        read_task_jsonl(path, task, tokenizer="whitespace")


def test_bad_task_declarations_fail_early(tmp_path):
    with pytest.raises(ValueError, match="task 'x': unknown type 'ranking'"):
        MultitaskDataModule(tasks=[{"name": "x", "type": "ranking"}])
    with pytest.raises(ValueError, match="task 'sentiment' is not an embedded arithmetic task"):
        MultitaskDataModule(tasks=[JSONL_TASKS[0]])
    with pytest.raises(
        ValueError, match="task 'roles': the embedded task is token_classification with num_classes=7"
    ):
        small(tasks=[TaskSpec("roles", "token_classification", num_classes=3)])
    with pytest.raises(FileNotFoundError, match=r"task 'sentiment'.*val.jsonl does not exist"):
        write(tmp_path / "sentiment" / "train.jsonl", [{"text": "a", "label": 0}])
        MultitaskDataModule(tasks=[JSONL_TASKS[0]], data_dir=str(tmp_path)).setup("fit")
