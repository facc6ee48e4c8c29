"""Compression of the zoo's other transformers. Structured pruning: ESM-2 (separate q/k/v, contact head) and the multitask
Transformer (grouped-query attention, encoder, decoders, cross-attention).

Each test silences one head (or key/value group) and half of the feed-forward units by hand, so they are the
least important; removing them must then leave every output unchanged, and the pruned model must reload.
"""

from __future__ import annotations

import pytest
import torch

from zoo.callbacks.compression import (
    prune_transformer,
    quantize_dynamic_int8,
    share_weights,
    state_dict_bytes,
)
from zoo.multitask import MultitaskTransformer, TaskSpec
from zoo.protein import ESM2MaskedLM

from .helpers import round_trip

LAYERS, HEADS, HEAD_DIM = 2, 4, 8


def tiny_esm(seed: int = 0) -> ESM2MaskedLM:
    torch.manual_seed(seed)
    return ESM2MaskedLM(
        model_kwargs={"num_layers": LAYERS, "embed_dim": HEADS * HEAD_DIM, "attention_heads": HEADS}
    ).eval()


def _zero(*tensors: torch.Tensor) -> None:
    with torch.no_grad():
        for tensor in tensors:
            tensor.zero_()


def _silence_odd_hidden_units(ffn: torch.nn.Module) -> None:
    _zero(ffn.fc1.weight[1::2], ffn.fc1.bias[1::2], ffn.fc2.weight[:, 1::2])


def test_esm2_heads_and_units_are_removed_and_the_contact_head_follows():
    module = tiny_esm()
    esm = module.model
    silent = slice(1 * HEAD_DIM, 2 * HEAD_DIM)  # head 1 of every layer
    for index, layer in enumerate(esm.layers):
        attn = layer.self_attn
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            _zero(proj.weight[silent], proj.bias[silent])
        _zero(attn.out_proj.weight[:, silent], esm.contact_head.regression.weight[:, index * HEADS + 1])
        _silence_odd_hidden_units(layer)
    tokens = torch.tensor([[0, 5, 8, 11, 6, 9, 13, 2], [0, 7, 4, 10, 2, 1, 1, 1]])
    expected = esm(tokens, return_contacts=True)

    record = prune_transformer(module, head_fraction=1 / HEADS, mlp_fraction=0.5)

    assert record["heads"] == {f"model.layers.{i}.self_attn": [0, 2, 3] for i in range(LAYERS)}
    assert record["mlp"] == {
        f"model.layers.{i}": list(range(0, 4 * HEADS * HEAD_DIM, 2)) for i in range(LAYERS)
    }
    assert esm.attention_heads == 3 and esm.contact_head.regression.in_features == LAYERS * 3
    assert esm.layers[0].self_attn.q_proj.out_features == 3 * HEAD_DIM
    pruned = esm(tokens, return_contacts=True)
    for key in ("logits", "contacts"):
        torch.testing.assert_close(pruned[key], expected[key], atol=1e-5, rtol=1e-5)
    reloaded = round_trip(module, tiny_esm(seed=3))
    torch.testing.assert_close(reloaded.model(tokens, return_contacts=True)["contacts"], pruned["contacts"])


def _gqa_multitask(seed: int = 0) -> MultitaskTransformer:
    torch.manual_seed(seed)
    tasks = [
        TaskSpec("cls", "sequence_classification", num_classes=3),
        TaskSpec("gen", "generation", max_target_length=8),
    ]
    return MultitaskTransformer(
        24, tasks, d_model=HEADS * HEAD_DIM, num_heads=HEADS, num_kv_heads=2, num_layers=2, decoder_layers=1
    ).eval()


def test_multitask_grouped_query_attention_loses_whole_key_value_groups():
    """4 query heads over 2 key/value heads: group 1 is query heads 2-3 with key/value head 1."""
    model = _gqa_multitask()
    query_silent, kv_silent = slice(2 * HEAD_DIM, 4 * HEAD_DIM), slice(HEAD_DIM, 2 * HEAD_DIM)
    value_silent = slice(3 * HEAD_DIM, 4 * HEAD_DIM)  # kv_proj rows are (key heads 0-1, value heads 0-1)
    attentions = [m for m in model.modules() if hasattr(m, "kv_proj")]
    assert (
        len(attentions) == 2 + 2 + 2
    )  # shared layers, one layer per task, decoder self- and cross-attention
    for attn in attentions:
        _zero(attn.q_proj.weight[query_silent], attn.q_proj.bias[query_silent])
        for rows in (kv_silent, value_silent):
            _zero(attn.kv_proj.weight[rows], attn.kv_proj.bias[rows])
        _zero(attn.out_proj.weight[:, query_silent])
    for module in model.modules():
        if hasattr(module, "fc1"):
            _silence_odd_hidden_units(module)
    ids = torch.randint(4, 24, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 5:] = False
    targets = torch.randint(4, 24, (3, 5), generator=torch.Generator().manual_seed(2))
    expected = [model(ids, mask, "cls"), model(ids, mask, "gen", targets)]

    record = prune_transformer(model, head_fraction=0.5, mlp_fraction=0.5)

    assert len(record["heads"]) == len(attentions) and all(keep == [0] for keep in record["heads"].values())
    for attn in attentions:
        assert (attn.num_heads, attn.num_kv_heads, attn.kv_proj.out_features) == (2, 1, 2 * HEAD_DIM)
    actual = [model(ids, mask, "cls"), model(ids, mask, "gen", targets)]
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    reloaded = round_trip(model, _gqa_multitask(seed=4))
    torch.testing.assert_close(reloaded(ids, mask, "gen", targets), actual[1], atol=0, rtol=0)


@pytest.fixture
def nondeterministic():
    """Quantized CPU kernels have no deterministic variant; other tests' trainers may have asked for one."""
    enabled = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    yield
    torch.use_deterministic_algorithms(enabled)


def _esm_case(seed: int = 0):
    tokens = torch.tensor([[0, 5, 8, 11, 6, 9, 13, 2], [0, 7, 4, 10, 2, 1, 1, 1]])
    return tiny_esm(seed), lambda module: module(tokens)


def _multitask_case(seed: int = 0):
    ids = torch.randint(4, 24, (3, 7), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(4, 24, (3, 5), generator=torch.Generator().manual_seed(2))
    return _gqa_multitask(seed), lambda model: model(ids, None, "gen", targets)


@pytest.mark.usefixtures("nondeterministic")
@pytest.mark.parametrize("case", [_esm_case, _multitask_case], ids=["esm2", "multitask"])
@pytest.mark.parametrize("method", ["int8", "kmeans"])
def test_quantization_and_weight_sharing_fit_the_other_transformers(case, method):
    """Dynamic int8 and 64-value k-means codebooks on ESM-2 and the multitask model: close, smaller, exact reload."""
    model, run = case()
    reference = run(model)
    float_bytes = state_dict_bytes(model)
    if method == "int8":
        quantize_dynamic_int8(model)
    else:
        share_weights(model, clusters=64)
    out = run(model)
    assert ((out - reference).norm() / reference.norm()).item() < 0.1  # measured: int8 1-3%, k-means 2-5%
    assert state_dict_bytes(model) < 0.6 * float_bytes
    fresh, _ = case(seed=7)
    torch.testing.assert_close(run(round_trip(model, fresh)), out, atol=0, rtol=0)
