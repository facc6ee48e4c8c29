"""``zoo export`` of ESM-2: the ``esm2`` and ``contacts`` graphs (pt2, ONNX) with a dynamic batch and sequence
length equal the eager model on padded batches, and the ``hf`` / ``fair-esm`` files load in transformers and
fair-esm with the zoo model's numbers."""

from __future__ import annotations

import argparse

import pytest
import torch

from tests.protein.helpers import randomize
from zoo.export import ExportError, export_model
from zoo.protein import ESM2MaskedLM, ESM2SequencePredictor
from zoo.protein.export import export_tokens

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = {"num_layers": 2, "embed_dim": 32, "attention_heads": 2}
TOLERANCE = 1e-4
#: a padded batch of a size and length neither the trace nor the check batch has
PADDED = ("MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNL", "MKV", "ACDEFGHIKLMNPQRST", "WYXB<mask>UZO")
UNPADDED = ("MKTAYIAKQRQISFV", "ACDEFGHIKLMNPQR")  # equal lengths: the eager model skips the mask


@pytest.fixture(scope="module")
def model() -> ESM2MaskedLM:
    """A tiny model with random weights (std 0.2: the training init would make every output small), layer 1
    pooled."""
    torch.manual_seed(0)
    module = ESM2MaskedLM(model_kwargs=TINY, embedding_layer=1, predict_contacts=True)
    randomize(module.model)
    return module.eval()


@pytest.fixture(scope="module", params=["pt2", "onnx"])
def exported(request, model, tmp_path_factory):
    """``(format, folder, manifest entries, {graph: tokens -> outputs})``: both graphs written once per format
    and loaded back."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp(request.param)
    entries = export_model(model, folder, request.param)
    runners = {e["graph"]: _runner(request.param, folder / e["file"]) for e in entries}
    return request.param, folder, entries, runners


def _runner(format: str, path):
    """``tokens -> list of outputs`` of an exported file."""
    if format == "pt2":
        program = torch.export.load(path).module()
        return lambda tokens: list(program(tokens))
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda tokens: [torch.from_numpy(t) for t in session.run(None, {"tokens": tokens.numpy()})]


def test_graphs_match_eager_on_the_trace_and_check_batches(exported):
    format, folder, entries, _ = exported
    assert [e["graph"] for e in entries] == ["esm2", "contacts"]
    for entry in entries:
        assert (folder / entry["file"]).is_file() and entry["format"] == format
        assert entry["inputs"] == [{"name": "tokens", "dtype": "int64", "shape": ["batch", "length"]}]
        assert max(entry["max_abs_difference"].values()) <= TOLERANCE, entry
    assert [o["name"] for o in entries[0]["outputs"]] == [
        "logits",
        "residue_embeddings",
        "sequence_embedding",
    ]
    assert [o["name"] for o in entries[1]["outputs"]] == ["contacts"]


@pytest.mark.parametrize("sequences", [PADDED, UNPADDED], ids=["padded", "unpadded"])
def test_exported_graphs_equal_eager_and_predict_on_other_batches(exported, model, sequences):
    """4 rows and a new length; the pooled embedding and the cropped contacts are ``predict``'s records."""
    runners = exported[3]
    tokens = export_tokens(model.alphabet, sequences)
    logits, residues, pooled = runners["esm2"](tokens)
    (contacts,) = runners["contacts"](tokens)
    with torch.no_grad():
        eager = model.model(tokens, repr_layers=[1], return_contacts=True)
        records = model.predict_step({"tokens": tokens, "ids": list(range(len(sequences)))}, 0)
    torch.testing.assert_close(logits, eager["logits"], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(residues, eager["representations"][1], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(contacts, eager["contacts"], atol=TOLERANCE, rtol=0)
    for row, record in enumerate(records):
        n = len(record["contacts"])
        torch.testing.assert_close(pooled[row], record["embedding"], atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(contacts[row, :n, :n], record["contacts"], atol=TOLERANCE, rtol=0)


def test_hf_format_loads_in_transformers_with_equal_logits(model, tmp_path):
    transformers = pytest.importorskip("transformers")
    (entry,) = export_model(model, tmp_path, "hf")
    assert entry["files"] == ["config.json", "model.safetensors"]
    reference = transformers.EsmForMaskedLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    tokens = export_tokens(model.alphabet, PADDED)
    mask = tokens.ne(model.alphabet.padding_idx).long()
    with torch.no_grad():
        expected = model.model(tokens, return_contacts=True)
        logits = reference(input_ids=tokens, attention_mask=mask).logits
        contacts = reference.esm.predict_contacts(tokens, attention_mask=mask)
    torch.testing.assert_close(logits, expected["logits"], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(contacts, expected["contacts"], atol=TOLERANCE, rtol=0)


def test_fair_esm_format_loads_in_fair_esm_with_equal_logits(model, tmp_path):
    esm = pytest.importorskip("esm")
    (entry,) = export_model(model, tmp_path, "fair-esm")
    assert entry["files"] == ["esm2_t2_32d.pt", "esm2_t2_32d-contact-regression.pt"]
    with torch.serialization.safe_globals([argparse.Namespace]):
        reference, alphabet = esm.pretrained.load_model_and_alphabet_local(tmp_path / entry["files"][0])
    tokens = alphabet.get_batch_converter()([(str(i), s) for i, s in enumerate(PADDED)])[2]
    assert torch.equal(tokens, export_tokens(model.alphabet, PADDED))
    with torch.no_grad():
        expected = model.model(tokens, repr_layers=[1], return_contacts=True)
        result = reference.eval()(tokens, repr_layers=[1], return_contacts=True)
    for key in ("logits", "contacts"):
        torch.testing.assert_close(result[key], expected[key], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(
        result["representations"][1], expected["representations"][1], atol=TOLERANCE, rtol=0
    )


def test_an_unknown_format_names_the_ones_offered(model, tmp_path):
    with pytest.raises(ExportError, match="pt2, onnx, hf, fair-esm"):
        export_model(model, tmp_path, "timm")


def test_finetuner_graph_has_a_dynamic_length(tmp_path):
    """A fine-tuned classifier (LoRA adapters, mean pooling) exports ``forward`` for any batch and length
    (pt2 here: ONNX lowers the same program, as the ``esm2`` graph's mean pooling shows)."""
    format = "pt2"
    torch.manual_seed(0)
    module = ESM2SequencePredictor(model_kwargs=TINY, num_classes=3, lora={"rank": 4}).eval()
    (entry,) = export_model(module, tmp_path, format)
    assert entry["inputs"][0]["shape"] == ["batch", "length"]
    assert max(entry["max_abs_difference"].values()) <= TOLERANCE
    tokens = export_tokens(module.alphabet, PADDED)
    (out,) = _runner(format, tmp_path / entry["file"])(tokens)
    with torch.no_grad():
        torch.testing.assert_close(out, module(tokens), atol=TOLERANCE, rtol=0)
