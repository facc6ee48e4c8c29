"""What ``zoo export`` writes for a multitask model: one graph per task, two per generation task.

- A classification, tagging or regression task: ``<task>``, ``(input_ids, padding_mask) -> output`` (the
  shared encoder with the task's adapters, its own layers and its head: what ``forward`` returns for it).
- A generation task: ``<task>_encoder``, ``(input_ids, padding_mask) -> memory`` (the task's encoder output),
  and ``<task>_decoder_step``, one greedy step with the self-attention cache as a tensor:
  ``(token_ids, memory, memory_mask, cache, position) -> (logits, updated_cache)``.

Each graph fixes its task: the task is a string, which a graph cannot take as an input.

Eager decoding (``zoo.multitask.decoding``) keeps the cache in a ``KVCache`` that grows by in-place writes
into a buffer; an exported step cannot hold Python state, so ``DecoderStep`` is the same computation with the
cache passed in and returned: ``(layers, 2, batch, kv_heads, capacity, head_dim)``, keys then values, the
capacity being the task's ``max_target_length``. The step writes the new token's keys/values at ``position``
(a select, no in-place write) and attends over the slots ``<= position``; slots beyond it hold zeros and are
masked. ``greedy_decode`` is the Python loop around the two graphs; it gives ``MultitaskModule.generate``'s
tokens (tested, with the written pt2 and ONNX files).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from zoo.export import ExportGraph
from zoo.multitask.model import MultitaskTransformer
from zoo.multitask.tasks import GENERATION
from zoo.multitask.vocab import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS

__all__ = ["DecoderStep", "TaskEncoder", "TaskGraph", "greedy_decode", "task_graphs"]

#: (batch, length) of the batch a graph is traced with, and of the second batch it is checked on
TRACE_SHAPE, CHECK_SHAPE = (2, 8), (3, 11)


class TaskGraph(nn.Module):
    """``forward`` of one classification, tagging or regression task: ``(input_ids, padding_mask) -> output``."""

    def __init__(self, model: MultitaskTransformer, task: str) -> None:
        super().__init__()
        self.model, self.task = model, task

    def forward(self, input_ids: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, padding_mask, self.task)


class TaskEncoder(TaskGraph):
    """A generation task's encoder output (the decoder's memory): ``(input_ids, padding_mask) -> (B, S, D)``."""

    def forward(self, input_ids: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode(input_ids, padding_mask, self.task)


class DecoderStep(nn.Module):
    """One decoding step of a generation task with the self-attention cache in and out as a tensor.

    ``forward(token_ids (B,), memory (B, S, D), memory_mask (B, S), cache, position ())`` ->
    ``{"logits": (B, V), "updated_cache": ...}``: the next-token logits after ``token_ids`` placed at ``position``
    (0 for ``<bos>``), and the cache with that token's keys/values written in. The cross-attention
    keys/values are projected from ``memory`` inside the step (eager decoding projects them once; the
    numbers are the same). ``position`` must stay below ``capacity``.
    """

    def __init__(self, model: MultitaskTransformer, task: str) -> None:
        super().__init__()
        self.model, self.task = model, task
        self.decoder = model.decoder(task)
        self.capacity = model.tasks[task].max_target_length

    def empty_cache(self, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The cache before ``<bos>``: zeros (unwritten slots are masked, and must not be NaN)."""
        attention = self.decoder.layers[0].self_attn
        shape = (len(self.decoder.layers), 2, batch_size, attention.num_kv_heads, self.capacity)
        dtype = self.decoder.out.weight.dtype
        return torch.zeros(*shape, attention.head_dim, dtype=dtype, device=device)

    def forward(
        self,
        token_ids: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
        cache: torch.Tensor,
        position: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        x = self.model.embed_tokens(token_ids[:, None], position)
        slots = torch.arange(self.capacity, device=token_ids.device)
        write = (slots == position)[:, None]  # broadcasts over (B, Hkv, capacity, d)
        visible = (slots <= position)[None, None, None, :]
        updated = []
        for i, layer in enumerate(self.decoder.layers):  # DecoderLayer.forward, cache as a tensor
            attention = layer.self_attn
            q, k, v = attention.self_projections(layer.self_norm(x), position)
            keys = torch.where(write, k, cache[i, 0])
            values = torch.where(write, v, cache[i, 1])
            x = x + attention.attend(q, keys, values, visible)
            cross = layer.project_memory(memory)
            x = x + layer.cross_attn(layer.cross_norm(x), memory_mask, memory_kv=cross)
            x = x + layer.ffn(layer.ffn_norm(x))
            updated.append(torch.stack([keys, values]))
        logits = self.decoder.out(self.decoder.norm(x))[:, 0]
        return {"logits": logits, "updated_cache": torch.stack(updated)}


Runner = Callable[..., Sequence[torch.Tensor]]


@torch.no_grad()
def greedy_decode(
    encoder: Runner, step: Runner, input_ids: torch.Tensor, padding_mask: torch.Tensor, cache: torch.Tensor
) -> torch.Tensor:
    """Greedy decoding with an encoder graph and a step graph (eager, ``torch.export``-loaded or wrapped
    ONNX Runtime sessions, each returning its outputs in order), as ``greedy_search`` decodes: ``<pad>`` and
    ``<bos>`` are never chosen, finished rows continue with ``<pad>``, decoding stops when every row has
    written ``<eos>``. ``cache`` is the step's empty cache for this batch (zeros); its capacity is the
    number of tokens at most generated. Returns the ids (B, <= capacity), ``<bos>`` excluded."""
    memory = encoder(input_ids, padding_mask)[0]
    batch = input_ids.shape[0]
    token = torch.full((batch,), BOS_ID, dtype=torch.long, device=input_ids.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    generated = []
    for position in range(cache.shape[4]):
        logits, cache = step(token, memory, padding_mask, cache, torch.tensor(position))
        logits = torch.as_tensor(logits).float().clone()
        logits[:, PAD_ID] = float("-inf")
        logits[:, BOS_ID] = float("-inf")
        token = torch.where(finished, PAD_ID, logits.argmax(-1))
        generated.append(token)
        finished |= token == EOS_ID
        if bool(finished.all()):
            break
    return torch.stack(generated, dim=1)


# ------------------------------------------------------------------------------------------ graphs
def token_batch(
    vocab_size: int, batch_size: int, length: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``(input_ids, padding_mask)`` of ordinary tokens, the last row padded after 5 tokens."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(len(SPECIAL_TOKENS), vocab_size, (batch_size, length), generator=generator)
    padding_mask = torch.ones_like(input_ids, dtype=torch.bool)
    padding_mask[-1, 5:] = False
    return input_ids.masked_fill(~padding_mask, PAD_ID), padding_mask


@torch.no_grad()
def _step_inputs(encoder: TaskEncoder, step: DecoderStep, batch: tuple[torch.Tensor, torch.Tensor],
                 steps: int) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """The step's inputs after ``steps`` greedy steps on ``batch``: a realistic, partly written cache."""
    input_ids, padding_mask = batch
    memory = encoder(input_ids, padding_mask)
    cache = step.empty_cache(input_ids.shape[0], input_ids.device)
    token = torch.full((input_ids.shape[0],), BOS_ID, dtype=torch.long, device=input_ids.device)
    steps = min(steps, step.capacity - 1)
    for position in range(steps):
        out = step(token, memory, padding_mask, cache, torch.tensor(position))
        token, cache = out["logits"].argmax(-1), out["updated_cache"]
    return token, memory, padding_mask, cache, torch.tensor(steps)


def task_graphs(model: MultitaskTransformer) -> list[ExportGraph]:
    """Every task's graphs, traced on a batch of 2 x 8 tokens and checked on 3 x 11 (dynamic batch and
    length); a decoder step is traced at position 2 and checked at position 4 (within its capacity)."""
    device = next(model.parameters()).device
    trace, check = (
        tuple(t.to(device) for t in token_batch(model.vocab_size, *shape, seed=seed))
        for shape, seed in ((TRACE_SHAPE, 0), (CHECK_SHAPE, 1))
    )
    tokens = {0: "batch", 1: "length"}

    def on_tokens(name: str, module: nn.Module, output: str) -> ExportGraph:
        inputs = ("input_ids", "padding_mask")
        return ExportGraph(
            name, module.eval(), trace, check, inputs, (output,), dynamic_dims=(tokens, tokens)
        )

    graphs = []
    for task, spec in model.tasks.items():
        if spec.type != GENERATION:
            graphs.append(on_tokens(task, TaskGraph(model, task), "output"))
            continue
        encoder, step = TaskEncoder(model, task).eval(), DecoderStep(model, task).eval()
        graphs.append(on_tokens(f"{task}_encoder", encoder, "memory"))
        graphs.append(
            ExportGraph(
                name=f"{task}_decoder_step",
                module=step,
                inputs=_step_inputs(encoder, step, trace, steps=2),
                check_inputs=_step_inputs(encoder, step, check, steps=4),
                input_names=("token_ids", "memory", "memory_mask", "cache", "position"),
                output_names=("logits", "updated_cache"),
                dynamic_dims=({0: "batch"}, tokens, tokens, {2: "batch"}, None),
            )
        )
    return graphs
