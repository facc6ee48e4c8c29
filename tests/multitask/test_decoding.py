"""Cached decoding is the uncached computation, token for token; beam search reduces to greedy."""

from __future__ import annotations

import pytest
import torch

from zoo.multitask import MultitaskTransformer, beam_search, greedy_search
from zoo.multitask.vocab import BOS_ID, EOS_ID, PAD_ID

VOCAB = 24


@pytest.fixture(params=["rotary", "sinusoidal"])
def model(request, tasks, tiny_model_kwargs):
    torch.manual_seed(0)
    return MultitaskTransformer(VOCAB, tasks, positions=request.param, **tiny_model_kwargs).eval()


def source(b: int = 4, t: int = 7):
    ids = torch.randint(4, VOCAB, (b, t), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 4:] = False
    return ids.masked_fill(~mask, PAD_ID), mask


def test_cached_step_logits_equal_full_recomputation(model):
    ids, mask = source()
    memory = model.encode(ids, mask, "gen")
    decoder = model.decoder("gen")
    kv = decoder.memory_kv(memory)
    prefix = torch.randint(4, VOCAB, (4, 10), generator=torch.Generator().manual_seed(2))
    full = model.decode("gen", prefix, kv, mask)
    caches = decoder.new_caches(10)
    steps = [model.decode("gen", prefix[:, i : i + 1], kv, mask, offset=i, caches=caches) for i in range(10)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_greedy_with_cache_gives_identical_tokens_at_128_new_tokens(model):
    ids, mask = source()
    cached = greedy_search(model, "gen", ids, mask, 128, use_cache=True, stop_at_eos=False)
    plain = greedy_search(model, "gen", ids, mask, 128, use_cache=False, stop_at_eos=False)
    assert cached.shape == (4, 128)
    assert torch.equal(cached, plain)
    assert not (cached == PAD_ID).any() and not (cached == BOS_ID).any() and not (cached == EOS_ID).any()


def test_beam_search_with_cache_equals_without(model):
    ids, mask = source()
    tokens_c, scores_c = beam_search(model, "gen", ids, mask, 16, num_beams=4, use_cache=True)
    tokens_p, scores_p = beam_search(model, "gen", ids, mask, 16, num_beams=4, use_cache=False)
    assert torch.equal(tokens_c, tokens_p)
    torch.testing.assert_close(scores_c, scores_p)


def test_one_beam_is_greedy_and_more_beams_score_no_worse(model):
    ids, mask = source()
    greedy = greedy_search(model, "gen", ids, mask, 16)
    one, _ = beam_search(model, "gen", ids, mask, 16, num_beams=1, length_penalty=0.0)
    assert torch.equal(one[:, : greedy.shape[1]], greedy)
    _, greedy_scores = beam_search(model, "gen", ids, mask, 16, num_beams=1, length_penalty=0.0)
    _, beam_scores = beam_search(model, "gen", ids, mask, 16, num_beams=4, length_penalty=0.0)
    assert (beam_scores >= greedy_scores - 1e-5).all()


def test_rows_finish_independently_and_pad_after_eos(tasks, tiny_model_kwargs):
    torch.manual_seed(0)
    model = MultitaskTransformer(VOCAB, tasks, **tiny_model_kwargs).eval()
    with torch.no_grad():  # make <eos> the first choice for every input: decoding stops at once
        model.heads["gen"].out.bias[EOS_ID] = 100.0
    ids, mask = source()
    out = greedy_search(model, "gen", ids, mask, 10)
    assert out.shape == (4, 1) and (out == EOS_ID).all()
