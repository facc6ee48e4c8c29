"""Contact precision (P@L, P@L/5 by separation range) against a brute-force reference, and in validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer

from zoo.datamodules.proteins import ProteinDataModule
from zoo.protein import ContactPrecision, ESM2MaskedLM
from zoo.protein.backbone import residue_lengths
from zoo.protein.metrics import CONTACT_RANGES


def _reference(
    preds: np.ndarray, target: np.ndarray, length: int, low: int, high: int | None, k: int
) -> float:
    """Top-k precision over pairs i < j < length with low <= j - i < high and a known target."""
    pairs = [
        (preds[i, j], target[i, j])
        for i in range(length)
        for j in range(i + 1, length)
        if j - i >= low and (high is None or j - i < high) and target[i, j] >= 0
    ]
    pairs.sort(key=lambda p: -p[0])
    return sum(t for _, t in pairs[:k]) / k


def test_matches_a_brute_force_reference():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([60, 35, 80])
    width = 80
    preds = torch.rand(3, width, width, generator=generator)
    target = (torch.rand(3, width, width, generator=generator) < 0.1).to(torch.int8)
    target[torch.rand(3, width, width, generator=generator) < 0.05] = -1  # unknown pairs
    for row, n in enumerate(lengths.tolist()):
        target[row, n:], target[row, :, n:] = -1, -1  # padding
    metric = ContactPrecision()
    metric.update(preds[:2], target[:2], lengths[:2])
    metric.update(preds[2:], target[2:], lengths[2:])
    result = metric.compute()
    for name, (low, high) in CONTACT_RANGES.items():
        for key, divisor in (("L", 1), ("L5", 5)):
            expected = np.mean(
                [
                    _reference(preds[r].numpy(), target[r].numpy(), n, low, high, max(1, n // divisor))
                    for r, n in enumerate(lengths.tolist())
                ]
            )
            assert result[f"P@{key}_{name}"].item() == pytest.approx(expected, abs=1e-6), (name, key)


def test_perfect_and_inverted_predictions():
    n = 100
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    target = torch.from_numpy(((np.abs(i - j) % 7 == 0) & (i != j)).astype(np.int8))[None]
    metric = ContactPrecision()
    metric.update(target.float(), target, torch.tensor([n]))
    perfect = metric.compute()
    assert perfect["P@L5_long"] == 1 and perfect["P@L5_short"] == 1  # enough contacts in every range
    metric.reset()
    metric.update(1 - target.float(), target, torch.tensor([n]))
    assert all(v == 0 for k, v in metric.compute().items() if k.startswith("P@L5"))


def test_validation_reports_contact_precision_when_the_data_has_contacts(tmp_path):
    rng = np.random.default_rng(0)
    letters = list("ACDEFGHIKLMNPQRSTVWY")
    records, maps = [], {}
    for k in range(8):
        sequence = "".join(rng.choice(letters, rng.integers(30, 60)))
        records.append(f">p{k}\n{sequence}\n")
        maps[f"p{k}"] = (rng.random((len(sequence), len(sequence))) < 0.1).astype(np.int8)
    (tmp_path / "seqs.fasta").write_text("".join(records))
    np.savez(tmp_path / "contacts.npz", **maps)
    data = ProteinDataModule(
        fasta=str(tmp_path / "seqs.fasta"),
        contacts=str(tmp_path / "contacts.npz"),
        batch_size=4,
        val_fraction=0.5,
        test_fraction=0.0,
    )
    model = ESM2MaskedLM(model_kwargs={"num_layers": 2, "embed_dim": 32, "attention_heads": 2})
    trainer = Trainer(
        logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path
    )
    metrics = trainer.validate(model, data, verbose=False)[0]
    reference = ContactPrecision()  # the same sequences, straight through the metric
    with torch.no_grad():
        for batch in data.val_dataloader():
            tokens = batch["tokens"]
            predicted = model.model(tokens, return_contacts=True)["contacts"]
            reference.update(predicted, batch["contacts"], residue_lengths(tokens, model.alphabet))
    expected = reference.compute()
    assert len(expected) == 2 * len(CONTACT_RANGES)
    for key, value in expected.items():
        assert metrics[f"val/contact_{key}"] == pytest.approx(value.item())
    assert "val/perplexity" in metrics
    tested = trainer.test(model, data, verbose=False)[0]
    assert {f"test/contact_{key}" for key in expected} <= set(tested)
