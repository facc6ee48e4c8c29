"""Cached decoding is the uncached computation, token for token; beam search reduces to greedy."""

from __future__ import annotations

import pytest
import torch

from zoo.multitask import MultitaskTransformer, beam_search, decoding, greedy_search
from zoo.multitask.attention import Attention, KVCache
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


# ------------------------------------------------------------ rows finishing apart, cache bookkeeping
MAX_NEW = 24


def padded_source(b: int = 6, t: int = 9):
    """Sources with padding in two rows (the memory mask matters for cross-attention)."""
    ids = torch.randint(4, VOCAB, (b, t), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 4:] = False
    mask[4, 6:] = False
    return ids.masked_fill(~mask, PAD_ID), mask


def eos_steps(tokens: torch.Tensor) -> list[int]:
    """The step at which each row wrote ``<eos>`` (-1: never)."""
    return [int((row == EOS_ID).nonzero()[0]) if (row == EOS_ID).any() else -1 for row in tokens]


def assert_special_tokens(tokens: torch.Tensor) -> None:
    """``<bos>`` never generated; ``<pad>`` exactly after a row's ``<eos>``, and only ``<pad>``."""
    assert not (tokens == BOS_ID).any()
    for row, step in zip(tokens, eos_steps(tokens), strict=True):
        if step < 0:
            assert not (row == PAD_ID).any()
        else:
            assert not (row[:step] == PAD_ID).any() and not (row[:step] == EOS_ID).any()
            assert (row[step + 1 :] == PAD_ID).all()


#: (seed, scale of the output layer, <eos> logit raises to try): random tiny models are searched for one
#: whose rows finish apart; a scaled output layer makes logits (and the steps rows finish at) vary more
FINISHING_SEARCH = [(0, 1.0, torch.arange(0.4, 2.0, 0.1)), (4, 3.0, torch.arange(0.0, 3.0, 0.25))]


def finishing_model(tasks, kwargs, positions: str, decode) -> tuple[MultitaskTransformer, torch.Tensor]:
    """A random model whose ``<eos>`` logit is raised just enough that every row of ``decode(model, True)``
    (cached) writes ``<eos>``, at three or more different steps: rows finish apart, and finished rows keep
    being decoded (with ``<pad>``) next to open ones."""
    for seed, scale, raises in FINISHING_SEARCH:
        for eos_raise in raises.tolist():
            torch.manual_seed(seed)
            model = MultitaskTransformer(VOCAB, tasks, positions=positions, **kwargs).eval()
            with torch.no_grad():
                model.heads["gen"].out.weight *= scale
                model.heads["gen"].out.bias[EOS_ID] += eos_raise
            tokens = decode(model, True)
            steps = eos_steps(tokens)
            if min(steps) >= 0 and len(set(steps)) >= 3:
                return model, tokens
    raise AssertionError("no model of the search has its rows finish at three different steps")


@pytest.mark.parametrize("positions", ["rotary", "sinusoidal"])
def test_greedy_rows_finishing_at_different_steps_decode_identically(tasks, tiny_model_kwargs, positions):
    ids, mask = padded_source()

    def decode(model, use_cache):
        return greedy_search(model, "gen", ids, mask, MAX_NEW, use_cache=use_cache)

    model, cached = finishing_model(tasks, tiny_model_kwargs, positions, decode)
    plain = decode(model, False)
    assert torch.equal(cached, plain)
    assert_special_tokens(cached)
    assert cached.shape[1] == max(eos_steps(cached)) + 1  # stopped once the last row finished


@pytest.mark.parametrize("positions", ["rotary", "sinusoidal"])
@pytest.mark.parametrize("num_beams", [3, 4])
def test_beam_rows_finishing_at_different_steps_decode_identically(
    tasks, tiny_model_kwargs, positions, num_beams
):
    ids, mask = padded_source()

    def decode(model, use_cache):
        return beam_search(model, "gen", ids, mask, MAX_NEW, num_beams=num_beams, use_cache=use_cache)[0]

    model, cached = finishing_model(tasks, tiny_model_kwargs, positions, decode)
    tokens_c, scores_c = beam_search(model, "gen", ids, mask, MAX_NEW, num_beams=num_beams, use_cache=True)
    tokens_p, scores_p = beam_search(model, "gen", ids, mask, MAX_NEW, num_beams=num_beams, use_cache=False)
    assert torch.equal(tokens_c, cached) and torch.equal(tokens_c, tokens_p)
    torch.testing.assert_close(scores_c, scores_p, atol=1e-5, rtol=1e-5)
    assert_special_tokens(tokens_c)


def test_checking_for_the_end_every_few_steps_gives_the_same_tokens(tasks, tiny_model_kwargs, monkeypatch):
    """Off the CPU, decoding reads "every row finished" only every few steps (no wait per step): it must
    return what the per-step check returns, with the steps run after the end cut off."""
    ids, mask = padded_source()

    def decode(model, use_cache):
        return greedy_search(model, "gen", ids, mask, MAX_NEW, use_cache=use_cache)

    model, greedy = finishing_model(tasks, tiny_model_kwargs, "rotary", decode)
    beam = beam_search(model, "gen", ids, mask, MAX_NEW, num_beams=4)
    for every in (3, 5, MAX_NEW + 1):
        monkeypatch.setattr(decoding._Finish, "interval", classmethod(lambda cls, device, e=every: e))
        assert torch.equal(decode(model, True), greedy)
        assert torch.equal(decode(model, False), greedy)
        lazy = beam_search(model, "gen", ids, mask, MAX_NEW, num_beams=4)
        assert torch.equal(lazy[0], beam[0]) and torch.equal(lazy[1], beam[1])


def test_cache_reorder_gathers_the_filled_prefix_into_the_spare_buffer():
    cache = KVCache(capacity=6)
    generator = torch.Generator().manual_seed(0)
    steps = [torch.randn(4, 2, 1, 3, generator=generator) for _ in range(5)]
    reference_k = []
    for i in range(3):
        cache.append(steps[i], -steps[i])
        reference_k.append(steps[i])
    buffers = cache.keys.data_ptr(), cache.values.data_ptr()
    index = torch.tensor([2, 2, 0, 1])
    cache.reorder(index)
    reference = torch.cat(reference_k, 2)[index]
    torch.testing.assert_close(cache.keys[:, :, :3], reference, atol=0, rtol=0)
    torch.testing.assert_close(cache.values[:, :, :3], -reference, atol=0, rtol=0)
    spare = cache.keys.data_ptr()
    assert spare not in buffers
    cache.append(steps[3], -steps[3])
    again = torch.tensor([3, 0, 0, 2])
    cache.reorder(again)  # back into the first buffers: no allocation per step
    assert (cache.keys.data_ptr(), cache.values.data_ptr()) == buffers
    reference = torch.cat([reference, steps[3]], 2)[again]
    keys, values = cache.append(steps[4], -steps[4])
    torch.testing.assert_close(keys, torch.cat([reference, steps[4]], 2), atol=0, rtol=0)
    torch.testing.assert_close(values, -torch.cat([reference, steps[4]], 2), atol=0, rtol=0)
    cache.reorder(torch.tensor([1, 3]))  # fewer rows: new buffers of the new batch
    assert cache.keys.shape[0] == 2 and cache.length == 5
    torch.testing.assert_close(
        cache.keys[:, :, :5], torch.cat([reference, steps[4]], 2)[[1, 3]], atol=0, rtol=0
    )


@pytest.mark.parametrize("beams", [1, 3])
def test_one_query_attention_over_shared_keys_equals_repeated_keys(beams):
    """``attend_one``: grouped-query heads and beam rows attend over the stored keys/values; the numbers
    are ``attend``'s over ``repeat_interleave`` copies."""
    torch.manual_seed(0)
    attention = Attention(32, num_heads=4, num_kv_heads=2).eval()
    sources, length = 2, 5
    q = torch.randn(sources * beams, 4, 1, 8)
    k, v = torch.randn(sources, 2, length, 8), torch.randn(sources, 2, length, 8)
    key_mask = torch.ones(sources, length, dtype=torch.bool)
    key_mask[1, 3:] = False
    got = attention.attend_one(q, k, v, key_mask[:, None, None, :])
    repeat = k.repeat_interleave(beams, 0), v.repeat_interleave(beams, 0)
    mask = key_mask.repeat_interleave(beams, 0)[:, None, None, :]
    torch.testing.assert_close(got, attention.attend(q, *repeat, mask), atol=1e-6, rtol=1e-5)


def test_cached_beam_search_projects_the_encoder_output_once_per_source(tasks, tiny_model_kwargs):
    """Cross-attention keys/values: one projection per call, at the source batch (not per beam, not per
    step); the uncached reference projects the beams' copies at every step."""
    torch.manual_seed(0)
    model = MultitaskTransformer(VOCAB, tasks, **tiny_model_kwargs).eval()
    decoder = model.decoder("gen")
    batches = []
    original = decoder.memory_kv

    def counting(memory):
        batches.append(memory.shape[0])
        return original(memory)

    decoder.memory_kv = counting
    ids, mask = source()
    beam_search(model, "gen", ids, mask, 8, num_beams=4, use_cache=True)
    assert batches == [4]
    batches.clear()
    steps = beam_search(model, "gen", ids, mask, 8, num_beams=4, use_cache=False)[0].shape[1]
    assert batches == [16] * steps


def test_hypotheses_share_their_source_memory_in_the_decoder(model):
    """The decoder given the encoder output once per source (r hypotheses each) computes what it computes
    on the output repeated per hypothesis: over a whole prefix, and one cached token at a time."""
    ids, mask = source()
    beams = 3
    decoder = model.decoder("gen")
    memory = model.encode(ids, mask, "gen")
    shared = decoder.memory_kv(memory)
    repeated = decoder.memory_kv(memory.repeat_interleave(beams, 0))
    mask_repeated = mask.repeat_interleave(beams, 0)
    prefix = torch.randint(4, VOCAB, (4 * beams, 6), generator=torch.Generator().manual_seed(2))
    full = model.decode("gen", prefix, repeated, mask_repeated)
    torch.testing.assert_close(model.decode("gen", prefix, shared, mask), full, atol=1e-5, rtol=1e-5)
    caches = decoder.new_caches(6)
    steps = [
        model.decode("gen", prefix[:, i : i + 1], shared, mask, offset=i, caches=caches) for i in range(6)
    ]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
