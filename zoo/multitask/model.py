"""``MultitaskTransformer``: one shared pre-LN encoder, per-task top layers and per-task heads.

Written by hand: no maintained library offers a shared encoder with per-task layers, adapters and
heterogeneous heads (classification, tagging, regression, a cached encoder-decoder) in one
``nn.Module``; the blocks are ``F.scaled_dot_product_attention`` underneath.

Sharing strategies (``sharing``):

- ``full``: every encoder layer is shared; tasks differ only in their heads.
- ``partial``: ``num_layers`` shared layers, then ``task_layers`` layers owned by each task.
- ``adapters``: shared layers, each with a bottleneck adapter per task (``adapter_dim``);
  ``task_layers`` may add private layers on top.

``PRESETS`` names architectures (``MultitaskTransformer.from_preset``, ``MultitaskModule(model_name=...)``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from zoo.multitask.attention import KVCache, sinusoidal_positions
from zoo.multitask.heads import Decoder, build_head
from zoo.multitask.layers import EncoderLayer
from zoo.multitask.tasks import GENERATION, TaskSpec, validate_tasks
from zoo.multitask.vocab import PAD_ID

__all__ = ["PRESETS", "SHARING", "MultitaskTransformer", "preset_arguments"]

SHARING = ("full", "partial", "adapters")
POSITIONS = ("sinusoidal", "rotary")

#: Named architectures: every ``MultitaskTransformer`` argument but the vocabulary size and the tasks.
PRESETS: dict[str, dict[str, Any]] = {
    # the constructor's defaults; the arithmetic configs add grouped-query attention (num_kv_heads: 2)
    "multitask_small": {
        "d_model": 128,
        "num_heads": 4,
        "num_kv_heads": None,
        "ffn_dim": None,
        "num_layers": 3,
        "sharing": "partial",
        "task_layers": None,
        "adapter_dim": 32,
        "positions": "rotary",
        "decoder_layers": 2,
        "dropout": 0.0,
    },
    # a few seconds of training on a CPU: tests and quick checks
    "multitask_tiny": {
        "d_model": 32,
        "num_heads": 2,
        "num_kv_heads": None,
        "ffn_dim": None,
        "num_layers": 1,
        "sharing": "partial",
        "task_layers": None,
        "adapter_dim": 32,
        "positions": "rotary",
        "decoder_layers": 1,
        "dropout": 0.0,
    },
}


def preset_arguments(model_name: str, model_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The preset's arguments with ``model_kwargs`` overriding single entries; unknown names fail early."""
    if model_name not in PRESETS:
        raise ValueError(f"unknown model_name {model_name!r}; expected one of {', '.join(PRESETS)}")
    arguments = dict(PRESETS[model_name])
    unknown = sorted(set(model_kwargs or {}) - set(arguments))
    if unknown:
        raise ValueError(
            f"model_kwargs {unknown} are not MultitaskTransformer arguments; "
            f"expected some of {', '.join(arguments)}"
        )
    return {**arguments, **(model_kwargs or {})}


class MultitaskTransformer(nn.Module):
    """Shared token embedding and encoder, then each task's layers, final norm and head.

    Args:
        vocab_size: size of the shared vocabulary (inputs and generated tokens).
        tasks: the task declarations (``TaskSpec`` or dicts with its fields).
        d_model / num_heads / ffn_dim: width, attention heads, feed-forward width (default 4x).
        num_kv_heads: key/value heads; fewer than ``num_heads`` is grouped-query attention.
        num_layers: shared encoder layers. task_layers: private layers per task (see ``sharing``).
        adapter_dim: bottleneck width of the per-task adapters (``sharing="adapters"``).
        positions: ``rotary`` (in every self-attention) or ``sinusoidal`` (added to embeddings).
        decoder_layers: layers of each generation task's decoder.
    """

    def __init__(
        self,
        vocab_size: int,
        tasks: list[TaskSpec],
        d_model: int = 128,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        ffn_dim: int | None = None,
        num_layers: int = 3,
        sharing: str = "partial",
        task_layers: int | None = None,
        adapter_dim: int = 32,
        positions: str = "rotary",
        decoder_layers: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.tasks = {t.name: t for t in validate_tasks(tasks)}
        if sharing not in SHARING:
            raise ValueError(f"unknown sharing {sharing!r}; expected one of {', '.join(SHARING)}")
        if positions not in POSITIONS:
            raise ValueError(f"unknown positions {positions!r}; expected one of {', '.join(POSITIONS)}")
        if task_layers is None:
            task_layers = 1 if sharing == "partial" else 0
        if sharing == "full" and task_layers:
            raise ValueError(
                "sharing='full' shares every encoder layer: set task_layers=0 or use sharing='partial'"
            )
        if sharing == "partial" and task_layers < 1:
            raise ValueError("sharing='partial' needs task_layers >= 1 private layers per task")
        if num_layers < 1:
            raise ValueError(f"num_layers (shared) must be >= 1, got {num_layers}")
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.sharing = sharing
        self.positions = positions
        ffn_dim = ffn_dim or 4 * d_model
        rotary = positions == "rotary"
        block = {"num_kv_heads": num_kv_heads, "dropout": dropout, "rotary": rotary}
        adapter_tasks = tuple(self.tasks) if sharing == "adapters" else ()

        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=PAD_ID)
        nn.init.normal_(self.embed.weight, std=d_model**-0.5)
        with torch.no_grad():
            self.embed.weight[PAD_ID].zero_()
        self.embed_dropout = nn.Dropout(dropout)
        self.shared = nn.ModuleList(
            EncoderLayer(
                d_model, num_heads, ffn_dim, adapter_tasks=adapter_tasks, adapter_dim=adapter_dim, **block
            )
            for _ in range(num_layers)
        )
        self.task_layers = nn.ModuleDict(
            {
                name: nn.ModuleList(
                    EncoderLayer(d_model, num_heads, ffn_dim, **block) for _ in range(task_layers)
                )
                for name in self.tasks
            }
        )
        self.task_norms = nn.ModuleDict({name: nn.LayerNorm(d_model) for name in self.tasks})
        decoder_kwargs = {"num_heads": num_heads, "ffn_dim": ffn_dim, "num_layers": decoder_layers, **block}
        self.heads = nn.ModuleDict(
            {name: build_head(spec, d_model, vocab_size, decoder_kwargs) for name, spec in self.tasks.items()}
        )

    @classmethod
    def from_preset(
        cls, model_name: str, vocab_size: int, tasks: list[TaskSpec], **overrides: Any
    ) -> MultitaskTransformer:
        """The ``PRESETS[model_name]`` architecture (with ``overrides``) for these tasks and vocabulary."""
        return cls(vocab_size, tasks, **preset_arguments(model_name, overrides))

    # ------------------------------------------------------------------ pieces
    def embed_tokens(self, ids: torch.Tensor, offset: int | torch.Tensor = 0) -> torch.Tensor:
        """Scaled embeddings of ``ids`` (B, T), the first at position ``offset`` (an int, or a 0-dim tensor in
        an exported decoder step)."""
        x = self.embed(ids) * math.sqrt(self.d_model)
        if self.positions == "sinusoidal":
            positions = torch.arange(ids.shape[1], device=ids.device) + offset
            x = x + sinusoidal_positions(positions, self.d_model).to(x.dtype)
        return self.embed_dropout(x)

    def encode(self, input_ids: torch.Tensor, padding_mask: torch.Tensor | None, task: str) -> torch.Tensor:
        """The task's view of the input: shared layers (with its adapters), its own layers, its norm."""
        self._check_task(task)
        x = self.embed_tokens(input_ids)
        for layer in self.shared:
            x = layer(x, padding_mask, task)
        for layer in self.task_layers[task]:
            x = layer(x, padding_mask)
        return self.task_norms[task](x)

    def decoder(self, task: str) -> Decoder:
        self._check_task(task)
        if self.tasks[task].type != GENERATION:
            raise ValueError(f"task {task!r} is {self.tasks[task].type}, not generation")
        return self.heads[task]

    def decode(
        self,
        task: str,
        target_ids: torch.Tensor,
        memory_kv: list[tuple[torch.Tensor, torch.Tensor]],
        memory_mask: torch.Tensor | None,
        offset: int = 0,
        caches: list[KVCache] | None = None,
    ) -> torch.Tensor:
        """Next-token logits for a target prefix (all positions, or the new ones with ``caches``)."""
        return self.decoder(task)(
            self.embed_tokens(target_ids, offset), memory_kv, memory_mask, offset, caches
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        padding_mask: torch.Tensor | None,
        task: str,
        decoder_input_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The prediction the task's loss uses: logits (B, C), (B, T, C), (B, L, V) or values (B, C)."""
        hidden = self.encode(input_ids, padding_mask, task)
        head = self.heads[task]
        if isinstance(head, Decoder):
            if decoder_input_ids is None:
                raise ValueError(f"generation task {task!r} needs decoder_input_ids (teacher forcing)")
            return self.decode(task, decoder_input_ids, head.memory_kv(hidden), padding_mask)
        return head(hidden, padding_mask)

    def last_shared_parameter(self) -> nn.Parameter:
        """GradNorm's ``W``: the output projection of the last shared layer's feed-forward."""
        return self.shared[-1].ffn.fc2.weight

    def _check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise KeyError(f"unknown task {task!r}; this model has {', '.join(self.tasks)}")
