"""Attention for the multitask Transformer: SDPA, grouped-query heads, rotary or sinusoidal positions.

Written by hand (not ``nn.MultiheadAttention``) because the decoder needs what that class lacks:
grouped-query attention, rotary positions that start at an offset, and a key/value cache that
grows one token at a time (``KVCache``) next to cross-attention keys/values computed once per
source sequence. Masks are boolean, True where a key may be attended, as SDPA expects.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Attention", "KVCache", "RotaryEmbedding", "sinusoidal_positions"]


def sinusoidal_positions(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Vaswani et al.'s table for the given positions: ``(T,) -> (T, dim)``, sin then cos halves."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, device=positions.device, dtype=torch.float32) / half
    )
    angles = positions.float()[:, None] * freqs[None]
    table = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return F.pad(table, (0, dim - 2 * half))


class RotaryEmbedding(nn.Module):
    """Rotary position embedding ("rotate half" layout), applied at absolute positions."""

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary positions need an even head dimension, got {head_dim}")
        self.head_dim = head_dim
        self.base = base

    def forward(self, x: torch.Tensor, offset: int | torch.Tensor = 0) -> torch.Tensor:
        """Rotate ``x`` (B, H, T, d) as if its first token sat at position ``offset``.

        ``offset`` may be a 0-dim integer tensor (an exported decoder step takes its position as an input):
        the positions are ``arange(T) + offset``, the same numbers either way.
        """
        t = x.shape[-2]
        inv_freq = 1.0 / (
            self.base
            ** (torch.arange(0, self.head_dim, 2, device=x.device, dtype=torch.float32) / self.head_dim)
        )
        positions = torch.arange(t, device=x.device, dtype=torch.float32) + offset
        angles = torch.outer(positions, inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Keys/values of the tokens decoded so far, for one attention layer, in a preallocated buffer.

    ``append`` writes the new step's keys/values and returns views of everything cached so far;
    ``reorder`` follows beam search when hypotheses are re-ranked.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, t, d = k.shape
        if self.keys is None:
            self.keys = k.new_empty(b, h, self.capacity, d)
            self.values = v.new_empty(b, h, self.capacity, d)
        end = self.length + t
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; step would reach {end}")
        self.keys[:, :, self.length : end] = k
        self.values[:, :, self.length : end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        if self.keys is not None:
            self.keys = self.keys.index_select(0, index)
            self.values = self.values.index_select(0, index)


class Attention(nn.Module):
    """Multi-head attention with ``num_kv_heads`` key/value heads (grouped-query when fewer than heads).

    Self-attention when called with ``x`` only; cross-attention when given ``memory_kv`` from
    ``project_memory`` (computed once per source, reused at every decoding step).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        dropout: float = 0.0,
        rotary: bool = False,
    ) -> None:
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not divisible by num_kv_heads={num_kv_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = d_model // num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.kv_proj = nn.Linear(d_model, 2 * num_kv_heads * self.head_dim)
        self.out_proj = nn.Linear(d_model, d_model)
        self.rotary = RotaryEmbedding(self.head_dim) if rotary else None

    def _split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, heads, self.head_dim).transpose(1, 2)

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values ``(B, Hkv, S, d)`` of a source sequence, for cross-attention."""
        k, v = self.kv_proj(memory).chunk(2, dim=-1)
        return self._split(k, self.num_kv_heads), self._split(v, self.num_kv_heads)

    def forward(
        self,
        x: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        causal: bool = False,
        offset: int = 0,
        cache: KVCache | None = None,
        memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``x`` (B, T, D) -> (B, T, D).

        ``key_mask`` (B, S) is True where a key is a real token; ``causal`` lets query ``i`` see keys
        up to its own position ``offset + i``; ``cache`` holds earlier steps' keys/values.
        """
        t = x.shape[1]
        if memory_kv is None:
            q, k, v = self.self_projections(x, offset)
            if cache is not None:
                k, v = cache.append(k, v)
        else:  # cross-attention: keys/values precomputed, no positions (the two sides are unrelated)
            q = self._split(self.q_proj(x), self.num_heads)
            k, v = memory_kv
        s = k.shape[-2]
        mask = None
        if key_mask is not None:
            mask = key_mask[:, None, None, :]
        if causal and t > 1:
            # query i is at absolute position s - t + i and sees keys 0 .. s - t + i
            allowed = torch.ones(t, s, dtype=torch.bool, device=x.device).tril(diagonal=s - t)
            mask = allowed if mask is None else mask & allowed
        return self.attend(q, k, v, mask)

    def self_projections(
        self, x: torch.Tensor, offset: int | torch.Tensor = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, H, T, d) and keys/values (B, Hkv, T, d) of ``x``, rotated to start at ``offset``."""
        q = self._split(self.q_proj(x), self.num_heads)
        k, v = self.kv_proj(x).chunk(2, dim=-1)
        k, v = self._split(k, self.num_kv_heads), self._split(v, self.num_kv_heads)
        if self.rotary is not None:
            q, k = self.rotary(q, offset), self.rotary(k, offset)
        return q, k, v

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Attention of queries (B, H, T, d) over keys/values (B, Hkv, S, d), True in ``mask`` where a key may
        be seen, then the output projection: (B, T, D). Shared with the exported decoder step."""
        b, _, t, _ = q.shape
        if self.num_kv_heads != self.num_heads:
            groups = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(out.transpose(1, 2).reshape(b, t, -1))
