"""Textual inversion: the vocabulary grows by one token, only its embedding trains, and it travels alone."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from safetensors.torch import load_file, save_file

from zoo.datamodules.instance_images import InstanceImageDataModule
from zoo.diffusion import CaptionConditioning, LatentDiffusion, TextualInversion, load_textual_inversion
from zoo.errors import ZooError

from .conftest import tiny_captions
from .test_export import tiny_clip


@pytest.fixture
def caption_kwargs(tiny_ldm_kwargs) -> dict:
    return {**tiny_ldm_kwargs, "conditioning": tiny_captions()}


@pytest.fixture
def base_checkpoint(caption_kwargs, tmp_path) -> str:
    torch.manual_seed(0)
    base = LatentDiffusion(**caption_kwargs)
    path = tmp_path / "base.ckpt"
    torch.save({"state_dict": base.state_dict()}, path)
    return str(path)


def _inversion(caption_kwargs, base_checkpoint, **overrides) -> TextualInversion:
    return TextualInversion(**{**caption_kwargs, "base_checkpoint": base_checkpoint, **overrides})


def _context(model, captions):
    with torch.no_grad():
        return model.conditioner(captions).context


def test_the_new_word_starts_as_its_initializer_and_the_vocabulary_is_otherwise_unchanged(
    caption_kwargs, base_checkpoint
):
    torch.manual_seed(0)
    base = LatentDiffusion(**{**caption_kwargs, "base_checkpoint": base_checkpoint}).eval()
    model = _inversion(caption_kwargs, base_checkpoint).eval()
    tokenizer = model.conditioner.tokenizer
    assert tokenizer.index["sks"] == len(tokenizer) - 1 == model.conditioner.encoder.tokens.base_rows
    torch.testing.assert_close(
        _context(model, ["a medium sks in the centre"]), _context(base, ["a medium circle in the centre"])
    )
    known = ["a small red square in the top left", ""]
    torch.testing.assert_close(_context(model, known), _context(base, known))
    assert [name for name, p in model.named_parameters() if p.requires_grad] == [
        "conditioner.encoder.tokens.extra"
    ]


def test_training_moves_only_the_new_row_and_writes_it_alone(caption_kwargs, base_checkpoint, tmp_path):
    model = _inversion(caption_kwargs, base_checkpoint)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = InstanceImageDataModule(img_size=16, batch_size=2, num_images=3, repeats=2)
    trainer = L.Trainer(max_steps=3, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=tmp_path, limit_val_batches=0)  # fmt: skip
    trainer.fit(model, data)
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == ["conditioner.encoder.tokens.extra"]
    (written,) = tmp_path.rglob("learned_embeds.safetensors")
    stored = load_file(str(written))
    assert list(stored) == ["sks"] and stored["sks"].shape == (1, 16)
    torch.testing.assert_close(stored["sks"], model.learned_rows.detach())

    # onto a fresh copy of the base: the same samples as the trained model
    fresh = LatentDiffusion(**{**caption_kwargs, "base_checkpoint": base_checkpoint}).eval()
    assert load_textual_inversion(fresh, written) == "sks"
    captions = ["a medium sks in the centre"] * 2
    torch.testing.assert_close(
        fresh.generate(captions=captions, seed=3), model.eval().generate(captions=captions, seed=3)
    )
    with pytest.raises(ZooError, match="'sks' is already in the caption vocabulary"):
        load_textual_inversion(fresh, written)


def test_several_vectors_expand_in_captions(caption_kwargs, base_checkpoint, tmp_path):
    model = _inversion(caption_kwargs, base_checkpoint, num_vectors=3).eval()
    assert model.learned_rows.shape == (3, 16)
    assert (
        model.conditioner.expand("a sks in the centre, not asks") == "a sks sks1 sks2 in the centre, not asks"
    )
    ids, _ = model.conditioner.tokenizer([model.conditioner.expand("sks")])
    first = model.conditioner.encoder.tokens.base_rows
    assert ids[0, 1:4].tolist() == [first, first + 1, first + 2]
    path = model.save_embeddings(tmp_path / "learned_embeds.safetensors")
    assert load_file(str(path))["sks"].shape == (3, 16)


def test_bad_tokens_and_files_are_refused(caption_kwargs, base_checkpoint, tiny_ldm_kwargs, tmp_path):
    with pytest.raises(ZooError, match="'circle' is already in the caption vocabulary"):
        _inversion(caption_kwargs, base_checkpoint, placeholder_token="circle")
    with pytest.raises(ZooError, match="is not one word"):
        _inversion(caption_kwargs, base_checkpoint, placeholder_token="<cat-toy>")
    for initializer in ("red circle", "dog"):
        with pytest.raises(ZooError, match="is not a word of the caption vocabulary"):
            _inversion(caption_kwargs, base_checkpoint, initializer_token=initializer)
    with pytest.raises(ZooError, match="needs CaptionConditioning"):
        TextualInversion(**tiny_ldm_kwargs)
    with pytest.raises(ZooError, match="num_vectors"):
        _inversion(caption_kwargs, base_checkpoint, num_vectors=0)
    model = _inversion(caption_kwargs, base_checkpoint)
    with pytest.raises(ZooError, match="no training caption names the new token"):
        model.training_step(
            {"image": torch.zeros(1, 3, 16, 16), "caption": ["a red circle"], "label": [-1]}, 0
        )
    two = tmp_path / "two.safetensors"
    save_file({"a": torch.zeros(1, 16), "b": torch.zeros(1, 16)}, str(two))
    fresh = LatentDiffusion(**{**caption_kwargs, "base_checkpoint": base_checkpoint})
    with pytest.raises(ZooError, match="one, named by its token"):
        load_textual_inversion(fresh, two)
    wide = tmp_path / "wide.safetensors"
    save_file({"new": torch.zeros(1, 8)}, str(wide))
    with pytest.raises(ZooError, match="8-wide embeddings"):
        load_textual_inversion(fresh, wide)


def test_a_local_clip_learns_the_token_in_diffusers_names(tiny_ldm_kwargs, tmp_path):
    clip = CaptionConditioning(text_encoder_path=tiny_clip(tmp_path / "clip"))
    model = TextualInversion(**{**tiny_ldm_kwargs, "conditioning": clip}, placeholder_token="<sks>",
                             initializer_token="a", num_vectors=2)  # fmt: skip
    tokenizer = model.conditioner.clip.tokenizer
    table = model.conditioner.clip.model.get_input_embeddings()
    assert tokenizer.convert_tokens_to_ids(["<sks>", "<sks>_1"]) == [table.base_rows, table.base_rows + 1]
    a = tokenizer.convert_tokens_to_ids("a</w>")
    torch.testing.assert_close(model.learned_rows, table.weight[a].repeat(2, 1))
    assert model.conditioner.expand("<sks> in the centre") == "<sks> <sks>_1 in the centre"
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0].endswith("token_embedding.extra")
    context = model.conditioner(["<sks>"]).context
    context.sum().backward()
    assert model.learned_rows.grad is not None and model.learned_rows.grad.abs().sum() > 0
    with pytest.raises(ZooError, match="is 2 CLIP tokens"):
        TextualInversion(**{**tiny_ldm_kwargs, "conditioning": clip}, initializer_token="ab")
