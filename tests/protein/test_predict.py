"""`zoo predict` writes per-protein embeddings (and contact maps) keyed by FASTA record id."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer

from zoo.cli import main
from zoo.datamodules.proteins import ProteinDataModule
from zoo.protein import ESM2MaskedLM, RecordPredictionWriter, load_predictions
from zoo.protein.fasta import read_fasta

from ..conftest import CONFIGS

FASTA = (
    ">sp|P1|first one\nMKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ\n>second\nMKVLAC*\n>third\nACDEFGHIKLMNPQRSTVWYX\n"
)


def test_zoo_predict_writes_embeddings_and_contacts_by_record_id(tmp_path):
    fasta = tmp_path / "query.fasta"
    fasta.write_text(FASTA)
    main(
        [
            "predict",
            "--config",
            str(CONFIGS / "protein" / "esm2_t6_8M.yaml"),
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            "--model.init_args.num_layers=2",
            "--model.init_args.embed_dim=32",
            "--model.init_args.attention_heads=2",
            "--model.init_args.predict_contacts=true",
            f"--data.init_args.fasta={fasta}",
            "--data.init_args.val_fraction=0.34",
            "--data.init_args.test_fraction=0.0",
        ]
    )
    written = load_predictions(tmp_path / "predictions" / "esm2.pt")
    records = read_fasta(fasta)
    assert set(written) == {"embeddings", "contacts"}
    assert set(written["embeddings"]) == {r.id for r in records}  # every record, not one split
    for record in records:
        assert written["embeddings"][record.id].shape == (32,)
        assert written["contacts"][record.id].shape == (len(record.sequence), len(record.sequence))


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_written_embeddings_are_the_chosen_layer_mean(tmp_path, suffix):
    pytest.importorskip("safetensors") if suffix == ".safetensors" else None
    fasta = tmp_path / "query.fasta"
    fasta.write_text(FASTA)
    model = ESM2MaskedLM(num_layers=2, embed_dim=32, attention_heads=2, embedding_layer=1).eval()
    writer = RecordPredictionWriter(output=f"out{suffix}")
    data = ProteinDataModule(
        fasta=str(fasta), max_tokens=64, max_length=40, val_fraction=0.34, test_fraction=0.0
    )
    trainer = Trainer(callbacks=[writer], logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.predict(model, data, return_predictions=False)
    written = load_predictions(tmp_path / f"out{suffix}")
    converter = model.alphabet.get_batch_converter()
    for record in read_fasta(fasta):
        tokens = converter([(record.id, record.sequence[:40])])[2]
        with torch.no_grad():
            hidden = model.model(tokens, repr_layers=[1])["representations"][1]
        expected = hidden[0, 1 : tokens.shape[1] - 1].mean(0)
        assert torch.allclose(written["embeddings"][record.id], expected, atol=1e-5)


def test_writer_rejects_unknown_formats():
    with pytest.raises(ValueError, match="must end in one of"):
        RecordPredictionWriter(output="out.h5")
