"""Fine-tuning heads: sequence classification/regression and residue classification, LoRA, label files."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer

from tests.protein.helpers import randomize
from zoo.datamodules.protein_labels import ProteinLabelDataModule, read_labeled_proteins
from zoo.lora import LoRAConfig
from zoo.protein import ESM2, ESM2ResiduePredictor, ESM2SequencePredictor
from zoo.protein.properties import gravy, is_membrane_protein, transmembrane_residues

TINY = {"num_layers": 2, "embed_dim": 32, "attention_heads": 2}


def _trainer(tmp_path, steps: int = 2) -> Trainer:
    return Trainer(
        max_epochs=1,
        limit_train_batches=steps,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )


def test_derived_labels_follow_kyte_doolittle():
    helix = "L" * 19
    assert is_membrane_protein("KKKK" + helix + "KKKK") and not is_membrane_protein("KDEKDEKDE" * 5)
    # a window holding up to 5 lysines (-3.9) and 14 leucines (3.8) still averages >= 1.6
    covered = transmembrane_residues("K" * 10 + helix + "K" * 10)
    assert covered.tolist() == [False] * 5 + [True] * 29 + [False] * 5
    assert gravy("AR") == pytest.approx((1.8 - 4.5) / 2)


def test_sequence_classifier_on_embedded_membrane_labels(tmp_path):
    data = ProteinLabelDataModule(max_tokens=2048, max_length=254)
    assert data.classes == ["soluble", "membrane"] and data.num_classes == 2
    assert sum(data.labels) == 639 and len(data.labels) == 2086
    model = ESM2SequencePredictor(num_classes=data.num_classes, class_names=data.classes, model_kwargs=TINY)
    trainer = _trainer(tmp_path)
    trainer.fit(model, data)
    metrics = trainer.callback_metrics
    assert {"val/acc", "val/f1", "val/loss"} <= set(metrics)
    batch = next(iter(data.val_dataloader()))
    records = model.predict_step(batch, 0)
    assert [r["id"] for r in records] == batch["ids"]
    for record in records:
        probabilities = record["probabilities"]
        assert list(probabilities) == ["soluble", "membrane"] and sum(
            probabilities.values()
        ) == pytest.approx(1)
        assert record["label"] == max(probabilities, key=probabilities.get)


def test_sequence_regression_from_csv(tmp_path):
    path = tmp_path / "stability.csv"
    rows = ["id,sequence,label"] + [f"s{i},{'MKTAYIAKQR'[: 3 + i % 7]}GG,{i / 10}" for i in range(20)]
    path.write_text("\n".join(rows) + "\n")
    data = ProteinLabelDataModule(file=str(path), task="sequence-regression", batch_size=4)
    model = ESM2SequencePredictor(task="sequence-regression", model_kwargs=TINY)
    trainer = _trainer(tmp_path)
    trainer.fit(model, data)
    assert {"val/mse", "val/loss"} <= set(trainer.callback_metrics)
    batch = next(iter(data.val_dataloader()))
    model.eval()
    with torch.no_grad():
        values = model(batch["tokens"]).tolist()
    records = model.predict_step(batch, 0)
    assert records == [{"id": i, "label": pytest.approx(v)} for i, v in zip(batch["ids"], values)]


def test_residue_classifier_from_tsv_keeps_labels_aligned(tmp_path):
    path = tmp_path / "ss.tsv"
    lines = ["id\tsequence\tlabel"] + [f"r{i}\tMKTAYIAKQRQISF\tCCHHHHHHEEEECC" for i in range(10)]
    path.write_text("\n".join(lines) + "\n")
    data = ProteinLabelDataModule(file=str(path), task="residue-classification", batch_size=3, max_length=6)
    assert data.classes == ["C", "E", "H"]
    data.setup("fit")
    for _ in range(10):  # random crops keep the labels of the cropped residues
        example = data.train_set[0]
        start = "MKTAYIAKQRQISF".index(example["sequence"])
        assert example["label"] == data.labels[0][start : start + 6]
    batch = data.collate([data.train_set[0], data.val_set[0]])
    assert batch["labels"].shape == batch["tokens"].shape
    assert (batch["labels"][:, 0] == -100).all() and (batch["labels"][:, 7:] == -100).all()
    model = ESM2ResiduePredictor(num_classes=3, class_names=data.classes, model_kwargs=TINY)
    trainer = _trainer(tmp_path)
    trainer.fit(model, data)
    assert {"val/acc", "val/f1"} <= set(trainer.callback_metrics)
    records = model.predict_step(batch, 0)
    for record in records:
        assert record["probabilities"].shape == (6, 3)
        expected = "".join("CEH"[c] for c in record["probabilities"].argmax(-1).tolist())
        assert record["label"] == expected  # one class character per residue, as in the label file


def test_predict_path_gives_a_record_for_every_unlabelled_protein(tmp_path):
    """The classes linked from the data name the predictions of an unlabelled FASTA file."""
    path = tmp_path / "ss.csv"
    path.write_text("id,sequence,label\n" + "".join(f"r{i},MKTAYIAKQR,CCHHHHEECC\n" for i in range(10)))
    query = tmp_path / "query.fasta"
    query.write_text(">q1 no label here\nMKTAYIAKQRQISF\n>q2\nMKV\n")
    data = ProteinLabelDataModule(
        file=str(path), task="residue-classification", batch_size=4, max_length=12, predict_path=str(query)
    )
    model = ESM2ResiduePredictor(num_classes=data.num_classes, class_names=data.classes, model_kwargs=TINY)
    records = [r for batch in _trainer(tmp_path).predict(model, data) for r in batch]
    assert [(r["id"], len(r["label"])) for r in records] == [("q1", 12), ("q2", 3)]  # cut to max_length
    assert all(set(r["label"]) <= {"C", "E", "H"} for r in records)


def test_class_names_must_match_the_classes():
    with pytest.raises(ValueError, match="3 class names"):
        ESM2SequencePredictor(num_classes=2, class_names=["a", "b", "c"], model_kwargs=TINY)
    with pytest.raises(ValueError, match="single characters"):
        ESM2ResiduePredictor(num_classes=2, class_names=["helix", "coil"], model_kwargs=TINY)
    assert ESM2SequencePredictor(num_classes=3, model_kwargs=TINY).label_names == ["0", "1", "2"]
    assert ESM2ResiduePredictor(num_classes=12, model_kwargs=TINY).label_names == "0123456789ab"


@pytest.mark.parametrize("module", [ESM2SequencePredictor, ESM2ResiduePredictor])
def test_example_inputs_run_the_fine_tuners(module):
    model = module(model_kwargs=TINY).eval()
    (tokens,) = model.example_inputs(batch_size=3)
    with torch.no_grad():
        out = model(tokens)
    assert out.shape[0] == 3 and out.shape[-1] == 2


def test_fasta_with_labels(tmp_path):
    path = tmp_path / "labels.fasta"
    path.write_text(">a label=yes extra=1\nMKT\n>b label=no\nMKV*\n")
    rows = read_labeled_proteins(path, "sequence-classification")
    assert [(r[0], r[1], r[2]) for r in rows] == [("a", "MKT", "yes"), ("b", "MKV", "no")]


@pytest.mark.parametrize(
    ("name", "text", "task", "message"),
    [
        (
            "x.csv",
            "id,seq,label\na,MKT,1\n",
            "sequence-regression",
            r"x.csv:1: missing column\(s\) \['sequence'\]",
        ),
        (
            "x.csv",
            "id,sequence,label\na,MKT,high\n",
            "sequence-regression",
            r"x.csv:2: label 'high' is not a number",
        ),
        (
            "x.csv",
            "id,sequence,label\na,MKT,1\na,MKV,2\n",
            "sequence-regression",
            r"x.csv:3: duplicate id 'a'",
        ),
        ("x.csv", "id,sequence,label\na,MKJT,1\n", "sequence-regression", r"x.csv:2: 'J' at residue 3"),
        ("x.csv", "id,sequence,label\na,,1\n", "sequence-regression", r"x.csv:2: empty sequence"),
        (
            "x.tsv",
            "id\tsequence\tlabel\na\tMKT\tHH\n",
            "residue-classification",
            r"x.tsv:2: 2 residue labels for 3",
        ),
        ("x.fasta", ">a\nMKT\n", "sequence-classification", r"x.fasta:1: header has no 'label=...'"),
    ],
)
def test_bad_label_files_name_file_and_line(tmp_path, name, text, task, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        ProteinLabelDataModule(file=str(path), task=task)


def test_unknown_class_and_task_mismatch(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("sequence,label\nMKT,a\nMKV,b\nMKW,c\n")
    with pytest.raises(ValueError, match=r"x.csv:4: label 'c' is not one of the classes \['a', 'b'\]"):
        ProteinLabelDataModule(file=str(path), classes=["a", "b"])
    data = ProteinLabelDataModule(file=str(path), val_fraction=0.34, test_fraction=0.0)
    model = ESM2SequencePredictor(task="sequence-regression", model_kwargs=TINY)
    with pytest.raises(
        ValueError, match="configured for 'sequence-regression' but the data is 'sequence-classification'"
    ):
        _trainer(tmp_path).fit(model, data)


def test_lora_trains_only_adapters_and_merges_back(tmp_path):
    source = randomize(ESM2(**TINY), seed=2)
    path = source.save_pretrained(tmp_path / "backbone.pt")
    model = ESM2SequencePredictor(pretrained=str(path), lora=LoRAConfig(rank=4, alpha=8.0), head_dropout=0.0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    assert {n.split(".")[-4] for n in trainable if "lora_" in n} == {"q_proj", "k_proj", "v_proj", "out_proj"}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    data = ProteinLabelDataModule(max_tokens=1024, max_length=126)
    _trainer(tmp_path, steps=3).fit(model, data)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # adapters moved
    model.eval()
    merged = model.merged_backbone().eval()
    tokens = next(iter(data.val_dataloader()))["tokens"][:4]
    with torch.no_grad():
        expected = model.features(tokens)
        result = merged(tokens, repr_layers=[2])["representations"][2]
    assert (result - expected).abs().max() < 1e-5
    saved = ESM2.from_pretrained(merged.save_pretrained(tmp_path / "merged.pt"))
    assert set(saved.state_dict()) == set(source.state_dict())


def test_frozen_backbone_trains_only_the_head():
    model = ESM2SequencePredictor(freeze_backbone=True, model_kwargs=TINY)
    assert all(n.startswith("head.") for n, p in model.named_parameters() if p.requires_grad)
    # only what produces the loss trains (DDP waits for every trainable parameter's gradient)
    partial = ESM2SequencePredictor(representation_layer=1, model_kwargs=TINY)
    trainable = {n.split(".")[0] for n, p in partial.model.named_parameters() if p.requires_grad}
    assert trainable == {"embed_tokens", "layers"}
    assert not any(p.requires_grad for p in partial.model.layers[1].parameters())
    with pytest.raises(ValueError, match="already freezes"):
        ESM2SequencePredictor(freeze_backbone=True, lora=LoRAConfig(rank=4), model_kwargs=TINY)
