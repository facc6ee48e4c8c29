"""``zoo serve`` for ESM-2: a request ``{"sequence", "id"}`` becomes the batch the predict loader makes for the
same FASTA record, bad requests name their field, and the real server answers with the offline predict record."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from lightning.pytorch import Trainer

from tests.conftest import CONFIGS
from tests.protein.helpers import randomize
from tests.serving.server import post, running_server
from zoo.datamodules.protein_labels import ProteinLabelDataModule
from zoo.datamodules.proteins import ProteinDataModule
from zoo.inference import load_trained_model
from zoo.protein import ESM2SequencePredictor
from zoo.serving import RequestError, json_record

pytestmark = pytest.mark.usefixtures("single_thread")

MAX_LENGTH = 40
#: FASTA records as users write them: a final stop codon, lowercase, every ESM letter
RECORDS = [
    ("sp|P1|first", "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ*"),
    ("second", "mkvLAC"),
    ("third", "ACDEFGHIKLMNPQRSTVWYXBUZO.-"),
]
TINY_ARGS = [
    "--config",
    str(CONFIGS / "protein" / "esm2_t6_8M.yaml"),
    "--model.init_args.model_kwargs={num_layers: 2, embed_dim: 32, attention_heads: 2}",
    "--model.init_args.predict_contacts=true",
    f"--data.init_args.max_length={MAX_LENGTH}",
]


@pytest.fixture(scope="module")
def codec():
    return ProteinDataModule(max_length=MAX_LENGTH).request_codec()


def test_requests_collate_to_the_predict_loaders_batch(tmp_path, codec):
    fasta = tmp_path / "query.fasta"
    fasta.write_text("".join(f">{name}\n{sequence}\n" for name, sequence in RECORDS))
    data = ProteinDataModule(max_length=MAX_LENGTH, batch_size=len(RECORDS), predict_path=str(fasta))
    data.setup("predict")
    (expected,) = list(data.predict_dataloader())
    ids = [name.split()[0] for name, _ in RECORDS]
    batch = codec.collate([codec.parse({"sequence": s, "id": i}) for i, (_, s) in zip(ids, RECORDS)])
    assert set(batch) == {"tokens", "ids"} and batch["ids"] == expected["ids"] == ids
    assert torch.equal(batch["tokens"], expected["tokens"])  # <cls>, residues, <eos>, <pad>


def test_lowercase_is_read_as_uppercase_and_a_final_stop_is_dropped(codec):
    assert (
        codec.parse({"sequence": "mkTa*"})
        == codec.parse({"sequence": "MKTA"})
        == {
            "id": "request",
            "sequence": "MKTA",
        }
    )
    codec.parse({"sequence": "A" * MAX_LENGTH})  # the limit itself is served


@pytest.mark.parametrize(
    ("payload", "field", "message"),
    [
        ({"sequence": "MKJA"}, "sequence", "character 'J' at position 2 is not one of"),
        ({"sequence": "MK<mask>"}, "sequence", "character '<' at position 2"),
        ({"sequence": "MK TA"}, "sequence", "character ' ' at position 2"),
        ({"sequence": "MK*TA"}, "sequence", "character '\\*' at position 2"),
        (
            {"sequence": "A" * (MAX_LENGTH + 1)},
            "sequence",
            f"41 characters, more than this model's {MAX_LENGTH}",
        ),
        ({}, "sequence", "missing"),
        ({"sequence": ""}, "sequence", "empty"),
        ({"sequence": 5}, "sequence", "expected a string, got int"),
        ({"sequence": ["M", "K"]}, "sequence", "expected a string, got list"),
        ({"sequence": "MK", "id": 3}, "id", "expected a string"),
        ({"sequence": "MK", "seq": "MK"}, "seq", "unknown field; this model takes 'sequence'"),
        (["MK"], "body", "expected a JSON object"),
    ],
)
def test_bad_requests_name_the_field(codec, payload, field, message):
    with pytest.raises(RequestError, match=message) as error:
        codec.parse(payload)
    assert error.value.field == field and str(error.value).startswith(f"{field}: ")


def test_fine_tuning_data_serves_the_same_requests():
    """``ProteinLabelDataModule`` reads requests as ``ProteinDataModule`` (no label), for the fine-tuned heads."""
    data = ProteinLabelDataModule(max_length=MAX_LENGTH)
    codec = data.request_codec()
    batch = codec.collate([codec.parse({"sequence": s, "id": str(i)}) for i, (_, s) in enumerate(RECORDS)])
    assert torch.equal(
        batch["tokens"],
        data.collate([{"id": "x", "sequence": s.upper().rstrip("*")} for _, s in RECORDS])["tokens"],
    )
    model = ESM2SequencePredictor(
        model_kwargs={"num_layers": 2, "embed_dim": 32, "attention_heads": 2},
        num_classes=2,
        class_names=data.classes,
    ).eval()
    with torch.no_grad():
        records = model.predict_step(batch, 0)
    assert [r["id"] for r in records] == ["0", "1", "2"] and all(r["label"] in data.classes for r in records)
    with pytest.raises(RequestError, match=f"more than this model's {MAX_LENGTH}"):
        codec.parse({"sequence": "A" * (MAX_LENGTH + 1)})


def _largest_difference(a, b) -> float:
    """The largest absolute difference between two JSON values of the same structure."""
    if isinstance(a, dict):
        assert set(a) == set(b)
        return max((_largest_difference(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, list):
        assert len(a) == len(b)
        return max((_largest_difference(x, y) for x, y in zip(a, b)), default=0.0)
    if isinstance(a, str):
        assert a == b
        return 0.0
    return abs(a - b)


def test_served_answers_equal_offline_predict_records(tmp_path):
    """A tiny checkpoint with random weights served; requests of unequal lengths sent at once (batched, so
    padded, when they reach the model within ``--batch_timeout``) are answered with the records
    ``predict_step`` gives each one alone; a bad one gets 422 and the server goes on serving."""
    trained = load_trained_model(TINY_ARGS, None)
    randomize(trained.module.model, std=0.1)
    trainer = Trainer(logger=False, enable_progress_bar=False, accelerator="cpu", default_root_dir=tmp_path)
    trainer.strategy.connect(trained.module)
    ckpt = tmp_path / "tiny.ckpt"
    trainer.save_checkpoint(ckpt, weights_only=True)

    offline = load_trained_model(TINY_ARGS, str(ckpt))
    codec = offline.datamodule.request_codec()
    payloads = [{"sequence": sequence, "id": name} for name, sequence in RECORDS]

    def expected(payload: dict) -> dict:
        with torch.no_grad():
            (record,) = offline.module.predict_step(codec.collate([codec.parse(payload)]), 0)
        return json_record(record)

    args = [*TINY_ARGS, "--ckpt_path", str(ckpt), "--accelerator", "cpu", "--max_batch_size", "4"]
    with running_server([*args, "--batch_timeout", "0.2"], tmp_path) as url:
        with ThreadPoolExecutor(len(payloads)) as pool:
            answers = list(pool.map(lambda p: post(f"{url}/predict", p), payloads))
        for payload, (status, answer) in zip(payloads, answers):
            assert status == 200, answer
            assert set(answer) == {"id", "embedding", "contacts"} and answer["id"] == payload["id"]
            assert len(answer["contacts"]) == len(payload["sequence"].rstrip("*"))
            assert _largest_difference(answer, expected(payload)) <= 1e-5

        status, answer = post(f"{url}/predict", {"sequence": "MKTJ", "id": "bad"})
        assert status == 422 and answer["field"] == "sequence" and "'J' at position 3" in answer["detail"]
        status, answer = post(f"{url}/predict", payloads[1])  # still serving
        assert status == 200 and _largest_difference(answer, expected(payloads[1])) <= 1e-5
