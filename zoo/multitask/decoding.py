"""Greedy and beam-search decoding for a generation task, with or without the KV cache.

With ``use_cache=True`` each step feeds only the newest token: self-attention keys/values of
earlier steps come from ``KVCache`` and cross-attention keys/values of the encoder output are
projected once. ``use_cache=False`` recomputes the whole prefix (and the cross-attention
projections) at every step: the reference the cache must match token for token.
"""

from __future__ import annotations

import torch

from zoo.multitask.model import MultitaskTransformer
from zoo.multitask.vocab import BOS_ID, EOS_ID, PAD_ID

__all__ = ["beam_search", "greedy_search"]


class _Stepper:
    """Next-token logits for the current prefixes, cached or recomputed."""

    def __init__(self, model, task, memory, memory_mask, capacity: int, use_cache: bool) -> None:
        self.model, self.task, self.memory, self.memory_mask = model, task, memory, memory_mask
        decoder = model.decoder(task)
        self.decoder = decoder
        self.use_cache = use_cache
        self.memory_kv = decoder.memory_kv(memory) if use_cache else None
        self.caches = decoder.new_caches(capacity) if use_cache else None

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.use_cache:
            offset = tokens.shape[1] - 1
            logits = self.model.decode(
                self.task, tokens[:, -1:], self.memory_kv, self.memory_mask, offset, self.caches
            )
        else:
            memory_kv = self.decoder.memory_kv(self.memory)
            logits = self.model.decode(self.task, tokens, memory_kv, self.memory_mask)
        logits = logits[:, -1].float()
        logits[:, PAD_ID] = float("-inf")  # never emitted: padding marks finished rows
        logits[:, BOS_ID] = float("-inf")
        return logits

    def reorder(self, index: torch.Tensor) -> None:
        if self.caches is not None:
            for cache in self.caches:
                cache.reorder(index)


@torch.no_grad()
def greedy_search(
    model: MultitaskTransformer,
    task: str,
    input_ids: torch.Tensor,
    padding_mask: torch.Tensor | None,
    max_new_tokens: int,
    use_cache: bool = True,
    stop_at_eos: bool = True,
) -> torch.Tensor:
    """Generated ids (B, <= max_new_tokens), ``<bos>`` excluded; after ``<eos>`` a row holds ``<pad>``.

    ``stop_at_eos=False`` keeps every row going to ``max_new_tokens`` (benchmarks).
    """
    memory = model.encode(input_ids, padding_mask, task)
    step = _Stepper(model, task, memory, padding_mask, max_new_tokens + 1, use_cache)
    tokens = torch.full((input_ids.shape[0], 1), BOS_ID, dtype=torch.long, device=input_ids.device)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        logits = step(tokens)
        if not stop_at_eos:
            logits[:, EOS_ID] = float("-inf")
        next_token = logits.argmax(-1)
        next_token = torch.where(finished, torch.full_like(next_token, PAD_ID), next_token)
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        finished |= next_token == EOS_ID
        if stop_at_eos and bool(finished.all()):
            break
    return tokens[:, 1:]


@torch.no_grad()
def beam_search(
    model: MultitaskTransformer,
    task: str,
    input_ids: torch.Tensor,
    padding_mask: torch.Tensor | None,
    max_new_tokens: int,
    num_beams: int = 4,
    length_penalty: float = 1.0,
    use_cache: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best hypothesis per input (B, L) and its score: summed log-probability / length**length_penalty.

    A hypothesis that emits ``<eos>`` stays in the beam with its score frozen (it can only be
    extended by ``<pad>`` at no cost), so finished and open hypotheses compete for the
    ``num_beams`` slots on raw log-probability; the length penalty ranks the survivors at the end.
    """
    b, k = input_ids.shape[0], num_beams
    device = input_ids.device
    memory = model.encode(input_ids, padding_mask, task).repeat_interleave(k, 0)
    mask = None if padding_mask is None else padding_mask.repeat_interleave(k, 0)
    step = _Stepper(model, task, memory, mask, max_new_tokens + 1, use_cache)
    tokens = torch.full((b * k, 1), BOS_ID, dtype=torch.long, device=device)
    scores = torch.full((b, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    finished = torch.zeros(b * k, dtype=torch.bool, device=device)
    lengths = torch.zeros(b * k, device=device)
    for _ in range(max_new_tokens):
        logprobs = step(tokens).log_softmax(-1)
        vocab = logprobs.shape[-1]
        frozen = torch.full_like(logprobs, float("-inf"))
        frozen[:, PAD_ID] = 0.0
        logprobs = torch.where(finished[:, None], frozen, logprobs)
        candidates = (scores.view(-1, 1) + logprobs).view(b, k * vocab)
        scores, flat = candidates.topk(k, dim=-1)
        beam = flat // vocab
        next_token = (flat % vocab).view(-1)
        index = (beam + torch.arange(b, device=device)[:, None] * k).view(-1)
        tokens = torch.cat([tokens.index_select(0, index), next_token[:, None]], dim=1)
        step.reorder(index)
        was_finished = finished.index_select(0, index)
        lengths = lengths.index_select(0, index) + (~was_finished).float()
        finished = was_finished | (next_token == EOS_ID)
        if bool(finished.all()):
            break
    normalised = scores / lengths.view(b, k).clamp(min=1) ** length_penalty
    best = normalised.argmax(-1)
    rows = best + torch.arange(b, device=device) * k
    return tokens[rows, 1:], normalised.gather(1, best[:, None]).squeeze(1)
