"""Our ESM2 equals fair-esm's ``esm.model.esm2.ESM2`` and HF's ``EsmForMaskedLM`` on the same random weights."""

from __future__ import annotations

import argparse
import warnings

import pytest
import torch

from tests.protein.helpers import randomize
from zoo.protein import ESM2, fair_esm_to_hf
from zoo.protein.backbone import init_for_training

esm = pytest.importorskip("esm")
transformers = pytest.importorskip("transformers")

ATOL = 1e-5
SIZES = [(2, 64, 4), (3, 48, 6)]  # (layers, dim, heads): two architectures, head_dim 16 and 8


def _fair_esm(layers: int, dim: int, heads: int, seed: int = 0):
    model = esm.model.esm2.ESM2(num_layers=layers, embed_dim=dim, attention_heads=heads)
    return randomize(model, seed)


def _assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape, what
    diff = (a - b).abs().max().item()
    assert diff <= ATOL, f"{what}: max |diff| = {diff:.2e} > {ATOL}"


@pytest.mark.parametrize(("layers", "dim", "heads"), SIZES)
def test_matches_fair_esm(layers, dim, heads, tokens):
    assert tokens.eq(1).any(), "the batch must be padded"
    reference = _fair_esm(layers, dim, heads)
    ours = ESM2(layers, dim, heads).eval()
    ours.load_state_dict(reference.state_dict())
    every_layer = list(range(layers + 1))
    with torch.no_grad():
        expected = reference(tokens, repr_layers=every_layer, return_contacts=True)
        with_contacts = ours(tokens, repr_layers=every_layer, return_contacts=True)
        fast = ours(tokens, repr_layers=every_layer)  # SDPA path, no attention maps
    assert "contacts" not in fast and "attentions" not in fast
    for result in (with_contacts, fast):
        _assert_close(result["logits"], expected["logits"], "logits")
        assert set(result["representations"]) == set(every_layer)
        for layer in every_layer:
            _assert_close(
                result["representations"][layer], expected["representations"][layer], f"layer {layer}"
            )
    _assert_close(with_contacts["contacts"], expected["contacts"], "contacts")
    _assert_close(with_contacts["attentions"], expected["attentions"], "attentions")


def test_state_dict_keys_equal_fair_esm():
    reference = esm.model.esm2.ESM2(num_layers=2, embed_dim=32, attention_heads=2)
    ours = ESM2(2, 32, 2)
    assert list(reference.state_dict()) == list(ours.state_dict())
    assert ours.lm_head.weight is ours.embed_tokens.weight


def _hf_model(layers: int, dim: int, heads: int, attn: str = "eager"):
    config = transformers.EsmConfig(
        vocab_size=33,
        mask_token_id=32,
        pad_token_id=1,
        hidden_size=dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * dim,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=1026,
        layer_norm_eps=1e-5,
        position_embedding_type="rotary",
        emb_layer_norm_before=False,
        token_dropout=True,
        tie_word_embeddings=True,
    )
    model = transformers.EsmForMaskedLM._from_config(config, attn_implementation=attn)
    return randomize(model, seed=1)


@pytest.mark.parametrize(("layers", "dim", "heads"), SIZES)
def test_matches_hf_esm_for_masked_lm(layers, dim, heads, tokens, tmp_path):
    reference = _hf_model(layers, dim, heads)
    reference.save_pretrained(tmp_path / "hf")
    ours = ESM2.from_pretrained(tmp_path / "hf").eval()
    mask = tokens.ne(1).long()
    with torch.no_grad():
        expected = reference(input_ids=tokens, attention_mask=mask, output_hidden_states=True)
        contacts = reference.esm.predict_contacts(tokens, attention_mask=mask)
        result = ours(tokens, repr_layers=range(layers + 1), return_contacts=True)
    _assert_close(result["logits"], expected.logits, "logits")
    # HF's hidden_states: embeddings, then each layer; fair-esm's (and our) last entry is HF's
    # last_hidden_state, i.e. after the final LayerNorm.
    for layer in range(layers):
        _assert_close(result["representations"][layer], expected.hidden_states[layer], f"layer {layer}")
    with torch.no_grad():
        final = reference.esm(input_ids=tokens, attention_mask=mask).last_hidden_state
    _assert_close(result["representations"][layers], final, "final layer")
    _assert_close(result["contacts"], contacts, "contacts")


def test_hf_state_dict_file_and_back(tmp_path, tokens):
    reference = _hf_model(2, 64, 4)
    torch.save(reference.state_dict(), tmp_path / "hf.pt")
    ours = ESM2.from_pretrained(tmp_path / "hf.pt").eval()
    # our weights mapped back load into HF without missing or unexpected keys
    fresh = _hf_model(2, 64, 4)
    missing, unexpected = fresh.load_state_dict(fair_esm_to_hf(ours.state_dict()), strict=False)
    assert missing == [] and unexpected == []
    with torch.no_grad():
        expected = reference(input_ids=tokens, attention_mask=tokens.ne(1).long()).logits
        _assert_close(ours(tokens)["logits"], expected, "logits")


def test_fair_esm_file_loads_in_both(tmp_path, tokens):
    """The hub layout (``encoder.`` keys, ``cfg`` Namespace, sibling regression file) loads in both."""
    reference = _fair_esm(2, 64, 4, seed=3)
    state = reference.state_dict()
    # published files hold fp16-rounded inv_freq: they must be copied, not recomputed
    for key in state:
        if key.endswith("inv_freq"):
            state[key] = state[key].half().float()
    reference.load_state_dict(state)
    lm = {f"encoder.sentence_encoder.{k}": v for k, v in state.items() if not k.startswith("contact_head")}
    cfg = argparse.Namespace(
        encoder_layers=2, encoder_embed_dim=64, encoder_attention_heads=4, token_dropout=True
    )
    path = tmp_path / "esm2_t2_test.pt"
    torch.save({"model": lm, "cfg": {"model": cfg}}, path)
    regression = {k: v for k, v in state.items() if k.startswith("contact_head")}
    torch.save({"model": regression}, tmp_path / "esm2_t2_test-contact-regression.pt")

    ours = ESM2.from_pretrained(path).eval()
    for key, value in state.items():
        assert torch.equal(ours.state_dict()[key], value), key
    with torch.no_grad():
        expected = reference(tokens, return_contacts=True)
        result = ours(tokens, return_contacts=True)
    _assert_close(result["logits"], expected["logits"], "logits")
    _assert_close(result["contacts"], expected["contacts"], "contacts")


def test_save_pretrained_round_trip_and_fair_esm_reads_it(tmp_path, tokens):
    ours = randomize(ESM2(2, 64, 4), seed=5)
    path = ours.save_pretrained(tmp_path / "esm2_t2_saved.pt")
    again = ESM2.from_pretrained(path).eval()
    for key, value in ours.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    with torch.serialization.safe_globals([argparse.Namespace]):
        reference, _ = esm.pretrained.load_model_and_alphabet_local(path)
    with torch.no_grad():
        _assert_close(
            reference.eval()(tokens, return_contacts=True)["contacts"],
            again(tokens, return_contacts=True)["contacts"],
            "contacts",
        )
        _assert_close(reference(tokens)["logits"], ours(tokens)["logits"], "logits")


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ESM2.from_pretrained(tmp_path / "nope.pt")
    (tmp_path / "dir").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        ESM2.from_pretrained(tmp_path / "dir")
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="neither a fair-esm file"):
        ESM2.from_pretrained(tmp_path / "other.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a loadable ESM-2 checkpoint"):
        ESM2.from_pretrained(tmp_path / "text.pt")


def test_untrusted_pickle_is_refused(tmp_path):
    """Only argparse.Namespace is allow-listed: any other object in the file is refused."""
    torch.save(
        {"model": {}, "cfg": {"model": warnings.WarningMessage("x", UserWarning, "f", 1)}},
        tmp_path / "evil.pt",
    )
    with pytest.raises(ValueError, match="not a loadable"):
        ESM2.from_pretrained(tmp_path / "evil.pt")


def test_zoo_convert_esm_writes_a_hf_folder_and_a_fair_esm_file(tmp_path, tokens, capsys):
    from zoo.commands import main

    ours = init_for_training(ESM2(2, 64, 4)).eval()  # pre-training init: logits of unit scale, as HF's
    ours.save_pretrained(tmp_path / "ours.pt")
    main(["convert-esm", str(tmp_path / "ours.pt"), str(tmp_path / "hf"), "--to", "hf"])
    reference = transformers.EsmForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        expected = reference(input_ids=tokens, attention_mask=tokens.ne(1).long()).logits
        _assert_close(ours(tokens)["logits"], expected, "logits")
    main(["convert-esm", str(tmp_path / "hf"), str(tmp_path / "back.pt"), "--to", "fair-esm"])
    back = ESM2.from_pretrained(tmp_path / "back.pt")
    for key, value in back.state_dict().items():
        if not key.startswith("contact_head."):  # HF's EsmForMaskedLM has no contact regression
            torch.testing.assert_close(value, ours.state_dict()[key], msg=key)
    assert "zoo: wrote" in capsys.readouterr().out
