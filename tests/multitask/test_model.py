"""The network: presets, heads per task type, sharing strategies, padding, GQA/rotary/sinusoidal attention."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from zoo.multitask import MultitaskTransformer, TaskSpec
from zoo.multitask.attention import Attention, RotaryEmbedding
from zoo.multitask.model import PRESETS
from zoo.multitask.vocab import PAD_ID

VOCAB = 20


def batch(b: int = 3, t: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, 6:] = False
    return ids.masked_fill(~mask, PAD_ID), mask


def test_presets_name_architectures(tasks):
    """``multitask_small`` is the constructor's defaults, over which old checkpoints are upgraded."""
    parameters = inspect.signature(MultitaskTransformer).parameters.values()
    assert PRESETS["multitask_small"] == {p.name: p.default for p in parameters if p.default is not p.empty}
    model = MultitaskTransformer.from_preset("multitask_tiny", VOCAB, tasks, num_layers=2)
    assert (model.d_model, len(model.shared), len(model.task_layers["cls"])) == (32, 2, 1)


@pytest.mark.parametrize("sharing", ["full", "partial", "adapters"])
@pytest.mark.parametrize("positions", ["rotary", "sinusoidal"])
def test_every_head_type_and_sharing_strategy(sharing, positions, tasks, tiny_model_kwargs):
    model = MultitaskTransformer(VOCAB, tasks, sharing=sharing, positions=positions, **tiny_model_kwargs)
    ids, mask = batch()
    assert model(ids, mask, "cls").shape == (3, 3)
    assert model(ids, mask, "tag").shape == (3, 9, 5)
    assert model(ids, mask, "reg").shape == (3, 2)
    assert model(ids, mask, "gen", ids[:, :4]).shape == (3, 4, VOCAB)
    task_layers = sum(len(layers) for layers in model.task_layers.values())
    assert task_layers == (4 if sharing == "partial" else 0)
    adapters = sum(len(layer.adapters) for layer in model.shared)
    assert adapters == (2 * 4 if sharing == "adapters" else 0)


def test_padding_does_not_change_predictions(tasks, tiny_model_kwargs):
    model = MultitaskTransformer(VOCAB, tasks, **tiny_model_kwargs).eval()
    ids, mask = batch()
    row, row_mask = ids[:1, :6], mask[:1, :6]
    for task in ("cls", "reg"):
        torch.testing.assert_close(
            model(ids, mask, task)[:1], model(row, row_mask, task), atol=1e-5, rtol=1e-5
        )
    torch.testing.assert_close(
        model(ids, mask, "tag")[:1, :6], model(row, row_mask, "tag"), atol=1e-5, rtol=1e-5
    )


def test_adapters_start_as_identity_and_are_task_specific(tasks, tiny_model_kwargs):
    torch.manual_seed(0)
    full = MultitaskTransformer(VOCAB, tasks, sharing="full", **tiny_model_kwargs).eval()
    adapted = MultitaskTransformer(VOCAB, tasks, sharing="adapters", **tiny_model_kwargs).eval()
    missing, unexpected = adapted.load_state_dict(full.state_dict(), strict=False)
    assert not unexpected and all(".adapters." in k for k in missing)
    ids, mask = batch()
    torch.testing.assert_close(adapted(ids, mask, "cls"), full(ids, mask, "cls"))
    adapted(ids, mask, "tag").sum().backward()
    grads = {n for n, p in adapted.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(".adapters.tag." in n for n in grads) and not any(".adapters.cls." in n for n in grads)


def test_partial_sharing_keeps_other_tasks_layers_untouched(tasks, tiny_model_kwargs):
    model = MultitaskTransformer(VOCAB, tasks, sharing="partial", task_layers=1, **tiny_model_kwargs)
    ids, mask = batch()
    model(ids, mask, "cls").sum().backward()
    touched = {
        n.split(".")[1]
        for n, p in model.named_parameters()
        if p.grad is not None and n.startswith("task_layers")
    }
    assert touched == {"cls"}
    assert model.last_shared_parameter().grad is not None


def test_attention_matches_torch_multihead_attention():
    """With as many key/value heads as heads and no rotary, ours is ``nn.MultiheadAttention``."""
    torch.manual_seed(0)
    ours = Attention(32, 4).eval()
    ref = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    with torch.no_grad():
        k_w, v_w = ours.kv_proj.weight.chunk(2)
        k_b, v_b = ours.kv_proj.bias.chunk(2)
        ref.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, k_w, v_w]))
        ref.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, k_b, v_b]))
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)
    x = torch.randn(2, 7, 32)
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[1, 5:] = False
    expected, _ = ref(x, x, x, key_padding_mask=~keep)
    torch.testing.assert_close(ours(x, keep), expected, atol=1e-5, rtol=1e-5)
    causal = torch.ones(7, 7, dtype=torch.bool).triu(1)
    expected, _ = ref(x, x, x, attn_mask=causal)
    torch.testing.assert_close(ours(x, causal=True), expected, atol=1e-5, rtol=1e-5)


def test_grouped_query_attention_equals_repeated_key_value_heads():
    torch.manual_seed(0)
    gqa = Attention(32, 4, num_kv_heads=2).eval()
    mha = Attention(32, 4, num_kv_heads=4).eval()
    hd = 8
    with torch.no_grad():
        mha.q_proj.load_state_dict(gqa.q_proj.state_dict())
        mha.out_proj.load_state_dict(gqa.out_proj.state_dict())
        k_w, v_w = gqa.kv_proj.weight.view(2, 2, hd, 32).unbind(0)  # (kv heads, d, in)
        k_b, v_b = gqa.kv_proj.bias.view(2, 2, hd).unbind(0)
        rep = lambda t: t.repeat_interleave(2, dim=0).flatten(0, 1)  # noqa: E731
        mha.kv_proj.weight.copy_(torch.cat([rep(k_w), rep(v_w)]))
        mha.kv_proj.bias.copy_(torch.cat([rep(k_b), rep(v_b)]))
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(gqa(x, causal=True), mha(x, causal=True), atol=1e-6, rtol=1e-5)
    assert gqa.kv_proj.weight.shape[0] == mha.kv_proj.weight.shape[0] // 2


def test_rotary_scores_depend_only_on_relative_position():
    rotary = RotaryEmbedding(16)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    scores = [(rotary(q, offset=o + 3) * rotary(k, offset=o)).sum() for o in (0, 5, 40)]
    torch.testing.assert_close(torch.stack(scores), scores[0].expand(3), atol=1e-4, rtol=1e-4)


def test_bad_declarations_fail_with_a_clear_message(tasks):
    with pytest.raises(ValueError, match="unknown type 'translation'"):
        TaskSpec("t", "translation")
    with pytest.raises(ValueError, match=r"task 'c'.*num_classes must be >= 2"):
        TaskSpec("c", "sequence_classification")
    with pytest.raises(ValueError, match="declared twice"):
        MultitaskTransformer(VOCAB, [tasks[0], tasks[0]])
    with pytest.raises(ValueError, match="sharing='full' shares every encoder layer"):
        MultitaskTransformer(VOCAB, tasks, sharing="full", task_layers=1)
    with pytest.raises(ValueError, match="num_heads=4 is not divisible by num_kv_heads=3"):
        MultitaskTransformer(VOCAB, tasks, num_kv_heads=3)
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        MultitaskTransformer(VOCAB, tasks, d_model=32).encode(*batch(), task="nope")
