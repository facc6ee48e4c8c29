"""Greedy and beam-search decoding for a generation task, with or without the KV cache.

With ``use_cache=True`` each step feeds only the newest token: self-attention keys/values of
earlier steps come from ``KVCache`` and cross-attention keys/values of the encoder output are
projected once per call, at the source batch (beam hypotheses of one source attend to the same
keys/values, see ``Attention.attend_one``; nothing is copied per beam or per step). When beams are
re-ranked the caches gather only their filled prefix. ``use_cache=False`` recomputes the whole prefix
(and the cross-attention projections of the encoder output repeated over the beams) at every step:
the reference the cache must match token for token.
"""

from __future__ import annotations

import torch

from zoo.multitask.model import MultitaskTransformer
from zoo.multitask.vocab import BOS_ID, EOS_ID, PAD_ID

__all__ = ["beam_search", "greedy_search"]


class _Stepper:
    """Next-token logits (float, the ``banned`` ids at ``-inf``) after ``tokens[:, : position + 1]``.

    ``memory`` and ``memory_mask`` are per source; ``beams`` rows of ``tokens`` follow each source.
    """

    def __init__(
        self,
        model: MultitaskTransformer,
        task: str,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None,
        capacity: int,
        use_cache: bool,
        banned: tuple[int, ...],
        beams: int = 1,
    ) -> None:
        self.model, self.task = model, task
        self.decoder = model.decoder(task)
        self.use_cache = use_cache
        # one add per step instead of index writes: + 0 leaves a logit unchanged, + -inf bans it
        self.bias = torch.zeros(model.vocab_size, device=memory.device)
        self.bias[list(banned)] = float("-inf")
        if use_cache:
            self.memory_mask = memory_mask
            self.memory_kv = self.decoder.memory_kv(memory)
            self.caches = self.decoder.new_caches(capacity)
        else:
            self.memory = memory.repeat_interleave(beams, 0) if beams > 1 else memory
            self.memory_mask = (
                memory_mask.repeat_interleave(beams, 0)
                if memory_mask is not None and beams > 1
                else memory_mask
            )
            self.caches = []

    def __call__(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        if self.use_cache:
            newest = tokens[:, position : position + 1]
            logits = self.model.decode(
                self.task, newest, self.memory_kv, self.memory_mask, position, self.caches
            )
        else:
            memory_kv = self.decoder.memory_kv(self.memory)
            logits = self.model.decode(self.task, tokens[:, : position + 1], memory_kv, self.memory_mask)
        return logits[:, -1].float() + self.bias

    def reorder(self, index: torch.Tensor) -> None:
        for cache in self.caches:
            cache.reorder(index)


class _Finish:
    """When to stop: once every row has finished. Asking waits for an accelerator to catch up, so off the CPU
    the answer is recorded per step without waiting and read every ``CHECK_EVERY`` steps; ``steps`` is then
    the number of steps the per-step check would have run, to cut the extra ones off."""

    CHECK_EVERY = 8

    def __init__(self, max_steps: int, device: torch.device) -> None:
        self.every = self.interval(device)
        self.done = torch.zeros(max_steps, dtype=torch.bool, device=device) if self.every > 1 else None
        self.steps = 0

    @classmethod
    def interval(cls, device: torch.device) -> int:
        return 1 if device.type == "cpu" else cls.CHECK_EVERY

    def __call__(self, finished: torch.Tensor, position: int) -> bool:
        """Whether to stop after step ``position``, where ``finished`` says which rows have finished."""
        self.steps = position + 1
        if self.done is None:
            return bool(finished.all())
        self.done[position] = finished.all()
        if self.steps % self.every and self.steps < self.done.shape[0]:
            return False
        done = self.done[: self.steps]
        if bool(done.any()):
            self.steps = int(done.int().argmax()) + 1  # the first step after which every row had finished
            return True
        return False


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
    b, device = input_ids.shape[0], input_ids.device
    memory = model.encode(input_ids, padding_mask, task)
    banned = (PAD_ID, BOS_ID) if stop_at_eos else (PAD_ID, BOS_ID, EOS_ID)  # <pad> marks finished rows
    step = _Stepper(model, task, memory, padding_mask, max_new_tokens + 1, use_cache, banned)
    tokens = torch.full((b, max_new_tokens + 1), PAD_ID, dtype=torch.long, device=device)
    tokens[:, 0] = BOS_ID
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    finish = _Finish(max_new_tokens, device)
    for position in range(max_new_tokens):
        next_token = step(tokens, position).argmax(-1).masked_fill_(finished, PAD_ID)
        tokens[:, position + 1] = next_token
        if not stop_at_eos:
            finish.steps = position + 1
            continue
        finished |= next_token == EOS_ID
        if finish(finished, position):
            break
    return tokens[:, 1 : finish.steps + 1]


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
    memory = model.encode(input_ids, padding_mask, task)
    step = _Stepper(model, task, memory, padding_mask, max_new_tokens + 1, use_cache, (PAD_ID, BOS_ID), k)
    tokens = torch.full((b * k, max_new_tokens + 1), PAD_ID, dtype=torch.long, device=device)
    tokens[:, 0] = BOS_ID
    scores = torch.full((b, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    finished = torch.zeros(b * k, dtype=torch.bool, device=device)
    lengths = torch.zeros(b * k, device=device)
    frozen = torch.full((model.vocab_size,), float("-inf"), device=device)
    frozen[PAD_ID] = 0.0  # a finished hypothesis is extended by <pad> at no cost
    first_beam = torch.arange(b, device=device)[:, None] * k
    finish = _Finish(max_new_tokens, device)
    for position in range(max_new_tokens):
        logprobs = step(tokens, position).log_softmax(-1)
        vocab = logprobs.shape[-1]
        logprobs = torch.where(finished[:, None], frozen, logprobs)
        candidates = (scores.view(-1, 1) + logprobs).view(b, k * vocab)
        scores, flat = candidates.topk(k, dim=-1)
        index = (flat // vocab + first_beam).view(-1)
        prefix = tokens[:, : position + 1]
        prefix.copy_(prefix.index_select(0, index))
        next_token = (flat % vocab).view(-1)
        tokens[:, position + 1] = next_token
        if k > 1:
            step.reorder(index)
        was_finished = finished.index_select(0, index)
        lengths = lengths.index_select(0, index) + (~was_finished).float()
        finished = was_finished | (next_token == EOS_ID)
        if finish(finished, position):
            break
    normalised = scores / lengths.view(b, k).clamp(min=1) ** length_penalty
    best = normalised.argmax(-1)
    rows = best + torch.arange(b, device=device) * k
    return tokens[rows, 1 : finish.steps + 1], normalised.gather(1, best[:, None]).squeeze(1)
