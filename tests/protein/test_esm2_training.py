"""ESM2MaskedLM: masking statistics, a training step, and the YAML config through the ``zoo`` CLI."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from zoo.datamodules.proteins import ProteinDataModule
from zoo.protein import Alphabet, ESM2MaskedLM, mask_tokens

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "protein" / "esm2_t6_8M.yaml"
TINY = {"num_layers": 2, "embed_dim": 32, "attention_heads": 2}


def test_masking_is_15_percent_80_10_10():
    alphabet = Alphabet()
    tokens = torch.randint(4, 24, (64, 502))
    tokens[:, 0], tokens[:, -1] = alphabet.cls_idx, alphabet.eos_idx
    tokens[:8, -100:] = alphabet.padding_idx
    inputs, labels = mask_tokens(tokens, alphabet, 0.15, torch.Generator().manual_seed(0))
    chosen = labels != -100
    specials = torch.isin(tokens, torch.tensor([alphabet.cls_idx, alphabet.eos_idx, alphabet.padding_idx]))
    assert not (chosen & specials).any()
    assert torch.equal(labels[chosen], tokens[chosen]) and torch.equal(inputs[~chosen], tokens[~chosen])
    assert abs(chosen.sum() / (~specials).sum() - 0.15) < 0.01
    masked = (inputs[chosen] == alphabet.mask_idx).float().mean()
    unchanged = (inputs[chosen] == tokens[chosen]).float().mean()  # includes random hits of the same residue
    assert abs(masked - 0.8) < 0.02 and abs(unchanged - 0.1 - 0.1 / 20) < 0.02
    assert torch.isin(inputs[chosen], torch.tensor([*alphabet.amino_acid_ids, alphabet.mask_idx])).all()


def test_at_least_one_position_is_masked():
    alphabet = Alphabet()
    tokens = alphabet.get_batch_converter()([("a", "M")])[2]
    _, labels = mask_tokens(tokens, alphabet, 0.01, torch.Generator().manual_seed(0))
    assert (labels != -100).sum() == 1


def test_fit_and_validate_tiny(tmp_path):
    model = ESM2MaskedLM(model_kwargs=TINY)
    data = ProteinDataModule(batch_size=8, max_length=30)
    trainer = Trainer(
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, data)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["val/loss"]) and metrics["val/perplexity"] > 1
    batch = next(iter(data.val_dataloader()))
    records = model.predict_step(batch, 0)
    assert [r["id"] for r in records] == batch["ids"]
    assert all(set(r) == {"id", "embedding"} and r["embedding"].shape == (32,) for r in records)


def test_example_inputs_are_framed_residue_tokens():
    model = ESM2MaskedLM(model_kwargs=TINY).eval()
    (tokens,) = model.example_inputs(batch_size=3)
    alphabet = model.alphabet
    assert tokens.dtype == torch.int64 and tokens.shape[0] == 3
    assert (tokens[:, 0] == alphabet.cls_idx).all() and (tokens[:, -1] == alphabet.eos_idx).all()
    assert torch.isin(tokens[:, 1:-1], torch.tensor(alphabet.amino_acid_ids)).all()
    with torch.no_grad():
        assert model(*model.example_inputs()).shape == (2, tokens.shape[1], len(alphabet))


def test_pretrained_checkpoint_is_loaded(tmp_path):
    source = ESM2MaskedLM(model_kwargs=TINY).model
    path = source.save_pretrained(tmp_path / "esm2_tiny.pt")
    model = ESM2MaskedLM(pretrained=str(path))
    assert torch.equal(model.model.embed_tokens.weight, source.embed_tokens.weight)
    with pytest.raises(FileNotFoundError):
        ESM2MaskedLM(pretrained=str(tmp_path / "missing.pt"))


def test_config_runs_through_zoo_cli(tmp_path):
    from zoo.commands import main

    main(
        [
            "fit",
            "--config",
            str(CONFIG),
            "--trainer.fast_dev_run=2",
            f"--trainer.default_root_dir={tmp_path}",
            "--model.init_args.model_kwargs={num_layers: 1, embed_dim: 32, attention_heads: 2}",
            "--data.init_args.max_tokens=256",
            "--data.init_args.max_length=62",
        ]
    )


@pytest.mark.slow
def test_validation_perplexity_falls_on_the_embedded_real_proteins(tmp_path):
    """Quality bar: on the 2,086 real proteins, validation perplexity falls below 70% of its starting
    value, and below the perplexity of predicting the training set's amino-acid frequencies, after
    60 steps of a 2-layer 64-d ESM-2 (well under 3 minutes on 2 CPU cores)."""
    from functools import partial

    torch.manual_seed(0)
    model = ESM2MaskedLM(
        model_kwargs={"num_layers": 2, "embed_dim": 64, "attention_heads": 4},
        optimizer=partial(torch.optim.AdamW, lr=2e-3, betas=(0.9, 0.98), weight_decay=0.01),
        lr_scheduler=None,
    )
    data = ProteinDataModule(max_tokens=4096, max_length=510)
    trainer = Trainer(
        max_epochs=1,
        limit_train_batches=60,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        inference_mode=False,
    )
    # inference_mode=False: metric states made by validate() under inference_mode break the later fit
    start = trainer.validate(model, data, verbose=False)[0]["val/perplexity"]
    trainer.fit(model, data)
    end = trainer.callback_metrics["val/perplexity"].item()
    unigram = _unigram_perplexity(data)
    print(
        f"val perplexity {start:.2f} -> {end:.2f} ({end / start:.2f}); amino-acid frequencies {unigram:.2f}"
    )
    assert end < 0.7 * start, f"validation perplexity {start:.2f} -> {end:.2f}"
    assert end < unigram, (
        f"validation perplexity {end:.2f} is not below amino-acid frequencies' {unigram:.2f}"
    )


def _unigram_perplexity(data: ProteinDataModule) -> float:
    """Perplexity on the validation masks of predicting each residue by its training-set frequency."""
    alphabet = data.alphabet
    counts = torch.zeros(len(alphabet))
    for batch in data.train_dataloader():
        counts += torch.bincount(batch["tokens"].flatten(), minlength=len(alphabet))
    counts[[alphabet.cls_idx, alphabet.eos_idx, alphabet.padding_idx]] = 0
    log_p = (counts / counts.sum()).clamp(min=1e-12).log()
    nll, n = 0.0, 0
    for batch_idx, batch in enumerate(data.val_dataloader()):
        _, labels = mask_tokens(batch["tokens"], alphabet, 0.15, torch.Generator().manual_seed(batch_idx))
        chosen = labels[labels != -100]
        nll -= log_p[chosen].sum().item()
        n += len(chosen)
    return math.exp(nll / n)
