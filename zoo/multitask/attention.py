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

    def cos_sin(
        self, t: int, offset: int | torch.Tensor, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotation ``(cos, sin)``, each (T, d), of ``t`` positions starting at ``offset``."""
        inv_freq = 1.0 / (
            self.base
            ** (torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32) / self.head_dim)
        )
        positions = torch.arange(t, device=device, dtype=torch.float32) + offset
        angles = torch.outer(positions, inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x`` (B, H, T, d) rotated by ``cos_sin``'s (T, d) tables."""
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    def forward(self, x: torch.Tensor, offset: int | torch.Tensor = 0) -> torch.Tensor:
        """Rotate ``x`` (B, H, T, d) as if its first token sat at position ``offset``.

        ``offset`` may be a 0-dim integer tensor (an exported decoder step takes its position as an input):
        the positions are ``arange(T) + offset``, the same numbers either way.
        """
        return self.rotate(x, *self.cos_sin(x.shape[-2], offset, x.device, x.dtype))


class KVCache:
    """Keys/values of the tokens decoded so far, for one attention layer, in a preallocated buffer.

    ``append`` writes the new step's keys/values and returns views of everything cached so far.
    ``reorder`` follows beam search when hypotheses are re-ranked: it gathers only the filled prefix
    (positions ``< length``) into a second buffer of the same size, and the two buffers swap roles, so a
    step neither allocates nor copies the unwritten tail. ``rotation`` keeps the rotary ``(cos, sin)``
    tables of every position the cache can hold (computed at the first step), which a step slices.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.length = 0
        self._spare: tuple[torch.Tensor, torch.Tensor] | None = None
        self._rotation: tuple[torch.Tensor, torch.Tensor] | None = None

    def rotation(
        self, rotary: RotaryEmbedding, offset: int, t: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``rotary.cos_sin(t, offset, ...)``, sliced from the tables of positions ``0 .. capacity - 1``."""
        if self._rotation is None:
            self._rotation = rotary.cos_sin(self.capacity, 0, device, dtype)
        cos, sin = self._rotation
        return cos[offset : offset + t], sin[offset : offset + t]

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
        """Row ``i`` becomes row ``index[i]`` (beam search's surviving hypotheses)."""
        if self.keys is None or not self.length:
            return
        if index.shape[0] != self.keys.shape[0]:  # the batch changes size: new buffers
            self.keys = self.keys.index_select(0, index)
            self.values = self.values.index_select(0, index)
            self._spare = None
            return
        if self._spare is None:
            self._spare = (torch.empty_like(self.keys), torch.empty_like(self.values))
        keys, values = self._spare
        filled = self.length
        torch.index_select(self.keys[:, :, :filled], 0, index, out=keys[:, :, :filled])
        torch.index_select(self.values[:, :, :filled], 0, index, out=values[:, :, :filled])
        self._spare = (self.keys, self.values)
        self.keys, self.values = keys, values


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
            rotation = None
            if cache is not None and self.rotary is not None and isinstance(offset, int):
                rotation = cache.rotation(self.rotary, offset, t, x.device, x.dtype)
            q, k, v = self.self_projections(x, offset, rotation)
            if cache is not None:
                k, v = cache.append(k, v)
        else:  # cross-attention: keys/values precomputed, no positions (the two sides are unrelated)
            q = self._split(self.q_proj(x), self.num_heads)
            k, v = memory_kv
        s = k.shape[-2]
        mask = None
        if key_mask is not None:
            mask = key_mask[:, None, None, :]
        if t == 1:  # a decoding step: one query per row, the causal mask allows every key
            return self.attend_one(q, k, v, mask)
        if k.shape[0] != q.shape[0]:  # memory of B / r sources for r hypotheses each
            r = q.shape[0] // k.shape[0]
            k, v = k.repeat_interleave(r, 0), v.repeat_interleave(r, 0)
            mask = None if mask is None else mask.repeat_interleave(r, 0)
        if causal:
            # query i is at absolute position s - t + i and sees keys 0 .. s - t + i
            allowed = torch.ones(t, s, dtype=torch.bool, device=x.device).tril(diagonal=s - t)
            mask = allowed if mask is None else mask & allowed
        return self.attend(q, k, v, mask)

    def self_projections(
        self,
        x: torch.Tensor,
        offset: int | torch.Tensor = 0,
        rotation: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, H, T, d) and keys/values (B, Hkv, T, d) of ``x``, rotated to start at ``offset``
        (by ``rotation``, ``RotaryEmbedding.cos_sin``'s tables, when given)."""
        q = self._split(self.q_proj(x), self.num_heads)
        k, v = self.kv_proj(x).chunk(2, dim=-1)
        k, v = self._split(k, self.num_kv_heads), self._split(v, self.num_kv_heads)
        if self.rotary is not None:
            if rotation is None:
                rotation = self.rotary.cos_sin(x.shape[1], offset, x.device, x.dtype)
            q, k = self.rotary.rotate(q, *rotation), self.rotary.rotate(k, *rotation)
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

    def attend_one(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """``attend`` for one query per row (a decoding step), without copying keys/values.

        The ``H / Hkv`` query heads that share a key/value head, and the ``r = B / Bk`` rows that share a
        source (beam hypotheses over one encoder output), become that head's query positions:
        queries (B, H, 1, d), keys/values (Bk, Hkv, S, d), ``mask`` (Bk, 1, 1, S) -> (B, 1, D). Grouped-query
        heads and beams are attended over the stored keys/values instead of ``repeat_interleave`` copies.
        """
        b, h, _, d = q.shape
        bk, hkv = k.shape[:2]
        r, g = b // bk, h // hkv
        if r * bk != b:
            raise ValueError(f"{b} query rows do not divide into the {bk} rows of keys/values")
        q = q.reshape(bk, r, hkv, g, d).transpose(1, 2).reshape(bk, hkv, r * g, d)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        out = out.reshape(bk, hkv, r, g, d).transpose(1, 2).reshape(b, 1, h * d)
        return self.out_proj(out)
