"""Serving the multitask model: requests become the predict loader's batches, bad ones are named, and the real
``zoo serve`` answers what ``zoo predict`` writes."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.serving.server import post, running_server
from zoo.cli import ZooCLI
from zoo.datamodules import MultitaskDataModule
from zoo.datamodules.multitask import MultitaskRequestCodec
from zoo.multitask import MultitaskModule, Vocabulary
from zoo.predict import load_records
from zoo.serving import RequestError

CONFIG = Path(__file__).parents[2] / "configs" / "multitask" / "arithmetic.yaml"
EXPRESSIONS = ["3+4*2", "(1+2)*3", "7", "9-8+1", "(5-2)*(4+1)"]


def data(**kwargs) -> MultitaskDataModule:
    return MultitaskDataModule(**{"train_size": 64, "val_size": 16, "test_size": 16, **kwargs})


def test_requests_collate_into_the_predict_loaders_batch(tmp_path):
    path = tmp_path / "expressions.txt"
    path.write_text("\n".join(EXPRESSIONS) + "\n")
    dm = data(predict_path=str(path))
    dm.setup("predict")
    expected = next(iter(dm.predict_dataloader()))
    codec = dm.request_codec()
    batch = codec.collate([codec.parse({"text": text}) for text in EXPRESSIONS])
    assert list(batch) == list(expected) == ["text", "id", "input_ids", "padding_mask"]
    assert batch["text"] == batch["id"] == expected["text"] == expected["id"] == EXPRESSIONS
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert torch.equal(batch["padding_mask"], expected["padding_mask"])
    assert not dm.datasets  # a server needs the vocabulary only: no data was generated


def test_a_request_id_names_the_record():
    dm = data()
    codec = dm.request_codec()
    batch = codec.collate([codec.parse({"text": "1+2", "id": "first"}), codec.parse({"text": "(3)"})])
    assert batch["id"] == ["first", "(3)"] and batch["text"] == ["1+2", "(3)"]
    module = MultitaskModule(dm.vocab_size, dm.tasks, model_name="multitask_tiny",
                             vocab_tokens=dm.vocab_tokens).eval()  # fmt: skip
    records = module.predict_step(batch, 0)
    assert [(r["id"], r["expression"]) for r in records] == [("first", "1+2"), ("(3)", "(3)")]
    assert [len(r["roles"]) for r in records] == [3, 3]


@pytest.mark.parametrize(
    ("payload", "field", "message"),
    [
        ({"text": "1+a"}, "text", "character 'a' at position 2 is outside the vocabulary '0123456789+-*()'"),
        ({"text": "1 + 2"}, "text", "character ' ' at position 1 is outside"),
        ({"text": "1" * 257}, "text", "257 characters, more than the limit of 256"),
        ({"text": ""}, "text", "empty"),
        ({"id": "x"}, "text", "missing"),
        ({"text": 12}, "text", "expected a string, got int"),
        ({"text": "1+2", "expression": "1+2"}, "expression", "unknown field"),
        ({"text": "1+2", "id": 5}, "id", "expected a string"),
        (["1+2"], "body", "expected a JSON object"),
    ],
)
def test_bad_requests_name_the_field(payload, field, message):
    with pytest.raises(RequestError, match=re.escape(message)) as error:
        data().request_codec().parse(payload)
    assert error.value.field == field


def test_word_level_requests_name_the_unknown_word_and_the_token_limit():
    codec = MultitaskRequestCodec(Vocabulary(["the", "cat", "sat"], "whitespace"), max_length=3)
    assert codec.parse({"text": "the cat  sat"})["input_ids"] == [4, 5, 6]
    with pytest.raises(RequestError, match="token 'dog' at position 1 is outside the vocabulary of 3 tokens"):
        codec.parse({"text": "the dog"})
    with pytest.raises(RequestError, match="token '<pad>' at position 0"):
        codec.parse({"text": "<pad> cat"})
    with pytest.raises(RequestError, match="4 tokens, more than the limit of 3"):
        codec.parse({"text": "the cat sat sat"})
    with pytest.raises(RequestError, match="holds no token"):
        codec.parse({"text": "   "})


def zoo_cli(command: str, *args: str, root: Path) -> ZooCLI:
    quiet = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    return ZooCLI(
        args=[command, "--config", str(CONFIG), *args, f"--trainer.default_root_dir={root}", *quiet]
    )


def test_the_server_answers_what_predict_writes(tmp_path, capsys):
    small = [
        "--data.init_args.train_size=64",
        "--data.init_args.val_size=16",
        "--data.init_args.test_size=16",
    ]
    zoo_cli("fit", "--trainer.max_steps=2", *small, root=tmp_path)
    checkpoint = next(tmp_path.rglob("last.ckpt"))
    expressions = tmp_path / "expressions.txt"
    expressions.write_text("\n".join(EXPRESSIONS) + "\n")
    capsys.readouterr()
    zoo_cli(
        "predict", f"--ckpt_path={checkpoint}", f"--data.init_args.predict_path={expressions}", root=tmp_path
    )
    folder = capsys.readouterr().out.split("zoo: predictions written to ")[1].split(" (")[0]
    offline = {record["id"]: record for record in load_records(folder)}
    assert list(offline) == EXPRESSIONS

    args = ["--config", str(CONFIG), "--ckpt_path", str(checkpoint), "--accelerator", "cpu",
            "--max_batch_size", "4", "--batch_timeout", "0.05"]  # fmt: skip
    with running_server(args, tmp_path) as url:
        with ThreadPoolExecutor(
            len(EXPRESSIONS)
        ) as pool:  # together: batched, padded to each batch's longest
            answers = list(pool.map(lambda text: post(f"{url}/predict", {"text": text}), EXPRESSIONS))
        assert answers == [(200, offline[text]) for text in EXPRESSIONS]

        status, answer = post(f"{url}/predict", {"text": "2*(3+4)x"})
        assert status == 422 and answer["field"] == "text" and "'x' at position 7" in answer["detail"]
        status, answer = post(f"{url}/predict", {"text": "1" * 300})
        assert status == 422 and answer["field"] == "text" and "limit of 256" in answer["detail"]
        status, answer = post(f"{url}/predict", {"expr": "1+2"})
        assert status == 422 and answer["field"] == "expr"
        assert post(f"{url}/predict", b"{not json")[0] == 400

        status, answer = post(f"{url}/predict", {"text": "(1+2)*3", "id": "after the bad ones"})
        assert status == 200 and answer == {**offline["(1+2)*3"], "id": "after the bad ones"}
        json.dumps(answer)  # plain JSON values
