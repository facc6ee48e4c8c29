"""One head per task type; each maps the task's encoder output to the prediction its loss uses."""

from __future__ import annotations

import torch
from torch import nn

from zoo.multitask.attention import KVCache
from zoo.multitask.layers import DecoderLayer
from zoo.multitask.tasks import (
    GENERATION,
    REGRESSION,
    SEQUENCE_CLASSIFICATION,
    TOKEN_CLASSIFICATION,
    TaskSpec,
)

__all__ = ["Decoder", "PooledHead", "TokenHead", "build_head"]


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Average over real tokens only, so padding never changes a sequence's prediction."""
    if mask is None:
        return hidden.mean(1)
    weights = mask.unsqueeze(-1).to(hidden)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


class PooledHead(nn.Module):
    """Sequence classification or regression: mean-pooled encoder output -> MLP -> ``num_outputs``."""

    def __init__(self, d_model: int, num_outputs: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, num_outputs))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.proj(masked_mean(hidden, mask))


class TokenHead(nn.Module):
    """Token classification: a label per position."""

    def __init__(self, d_model: int, num_classes: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_model, num_classes)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.proj(hidden)


class Decoder(nn.Module):
    """A small autoregressive decoder cross-attending to the task's encoder output.

    Token embeddings (and sinusoidal positions) come from the model's shared embedding, so the
    decoder takes embedded inputs; ``memory_kv`` projects the encoder output once per layer.
    """

    def __init__(
        self, d_model: int, num_heads: int, ffn_dim: int, vocab_size: int, num_layers: int, **layer_kwargs
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, num_heads, ffn_dim, **layer_kwargs) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, vocab_size)

    def memory_kv(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [layer.project_memory(memory) for layer in self.layers]

    def new_caches(self, capacity: int) -> list[KVCache]:
        return [KVCache(capacity) for _ in self.layers]

    def forward(
        self,
        x: torch.Tensor,
        memory_kv: list[tuple[torch.Tensor, torch.Tensor]],
        memory_mask: torch.Tensor | None,
        offset: int = 0,
        caches: list[KVCache] | None = None,
    ) -> torch.Tensor:
        """Embedded target prefix ``x`` (B, T, D) starting at position ``offset`` -> logits (B, T, V)."""
        for i, layer in enumerate(self.layers):
            x = layer(x, memory_kv[i], memory_mask, offset, None if caches is None else caches[i])
        return self.out(self.norm(x))


def build_head(spec: TaskSpec, d_model: int, vocab_size: int, decoder_kwargs: dict) -> nn.Module:
    if spec.type in (SEQUENCE_CLASSIFICATION, REGRESSION):
        return PooledHead(d_model, spec.num_classes)
    if spec.type == TOKEN_CLASSIFICATION:
        return TokenHead(d_model, spec.num_classes)
    if spec.type == GENERATION:
        return Decoder(d_model=d_model, vocab_size=vocab_size, **decoder_kwargs)
    raise ValueError(f"task {spec.name!r}: no head for type {spec.type!r}")
