"""``zoo predict``: one record per protein of the user's FASTA file, under its record id; the tensors read
back with ``zoo.protein.load_predictions``."""

from __future__ import annotations

import json

import torch
from lightning.pytorch import Trainer

from zoo.commands import main
from zoo.datamodules.proteins import ProteinDataModule
from zoo.protein import ESM2MaskedLM, load_predictions
from zoo.protein.fasta import read_fasta

from ..conftest import CONFIGS

FASTA = (
    ">sp|P1|first one\nMKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ\n>second\nMKVLAC*\n>third\nACDEFGHIKLMNPQRSTVWYX\n"
)
TINY = {"num_layers": 2, "embed_dim": 32, "attention_heads": 2}


def _records(predictions: list[list[dict]]) -> dict[str, dict]:
    return {record["id"]: record for batch in predictions for record in batch}


def test_zoo_predict_writes_one_record_per_protein_of_the_predict_file(tmp_path):
    fasta = tmp_path / "query.fasta"
    fasta.write_text(FASTA)
    main(
        [
            "predict",
            "--config",
            str(CONFIGS / "protein" / "esm2_t6_8M.yaml"),
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--model.init_args.model_kwargs={num_layers: 2, embed_dim: 32, attention_heads: 2}",
            "--model.init_args.predict_contacts=true",
            f"--data.init_args.predict_path={fasta}",
        ]
    )
    folder = tmp_path / "predictions"
    lines = (folder / "predictions.jsonl").read_text().splitlines()
    records = {r["id"]: r for r in map(json.loads, lines)}
    tensors = load_predictions(folder / "tensors.pt")
    proteins = read_fasta(fasta)
    assert set(records) == {p.id for p in proteins} and len(lines) == len(proteins)  # every record, once
    for protein in proteins:
        length = len(protein.sequence)
        assert records[protein.id]["embedding"] == {"tensor": "embedding", "shape": [32]}
        assert tensors["embedding"][protein.id].shape == (32,)
        assert tensors["contacts"][protein.id].shape == (length, length)


def test_embedding_is_the_chosen_layer_mean_over_residues(tmp_path):
    fasta = tmp_path / "query.fasta"
    fasta.write_text(FASTA)
    model = ESM2MaskedLM(model_kwargs=TINY, embedding_layer=1).eval()
    data = ProteinDataModule(max_tokens=64, max_length=40, predict_path=str(fasta))
    trainer = Trainer(logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    records = _records(trainer.predict(model, data))
    converter = model.alphabet.get_batch_converter()
    for protein in read_fasta(fasta):
        assert set(records[protein.id]) == {"id", "embedding"}
        tokens = converter([(protein.id, protein.sequence[:40])])[2]
        with torch.no_grad():
            hidden = model.model(tokens, repr_layers=[1])["representations"][1]
        expected = hidden[0, 1 : tokens.shape[1] - 1].mean(0)
        assert torch.allclose(records[protein.id]["embedding"], expected, atol=1e-5)


def test_zoo_predict_names_the_classes_of_the_membrane_config(tmp_path):
    """The data's class names reach the classifier (and its hyper-parameters merge with the data's)."""
    fasta = tmp_path / "query.fasta"
    fasta.write_text(FASTA)
    main(
        [
            "predict",
            "--config",
            str(CONFIGS / "protein" / "esm2_t6_8M_membrane.yaml"),
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--model.init_args.model_kwargs={num_layers: 2, embed_dim: 32, attention_heads: 2}",
            f"--data.init_args.predict_path={fasta}",
        ]
    )
    (written,) = tmp_path.rglob("predictions.jsonl")
    records = [json.loads(line) for line in written.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == sorted(p.id for p in read_fasta(fasta))  # batched by length
    for record in records:
        assert set(record) == {"id", "label", "probabilities"}
        assert set(record["probabilities"]) == {"soluble", "membrane"} and record["label"] in {
            "soluble",
            "membrane",
        }
