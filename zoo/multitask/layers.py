"""Pre-LayerNorm Transformer blocks: encoder layer (with optional per-task adapters) and decoder layer.

Both are the repeated units FSDP shards (``sharding_units``). The adapters are Houlsby/Pfeiffer
bottlenecks (down-project, GELU, up-project, residual) after the feed-forward sublayer, one per
task; their up-projection starts at zero so a new adapter leaves the shared layer unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zoo.multitask.attention import Attention, KVCache

__all__ = ["Adapter", "DecoderLayer", "EncoderLayer", "FeedForward"]


class FeedForward(nn.Module):
    def __init__(self, d_model: int, ffn_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(F.gelu(self.fc1(x))))


class Adapter(nn.Module):
    """Bottleneck adapter ``x + up(gelu(down(LN(x))))``, identity at initialisation."""

    def __init__(self, d_model: int, bottleneck: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.down = nn.Linear(d_model, bottleneck)
        self.up = nn.Linear(bottleneck, d_model)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(F.gelu(self.down(self.norm(x))))


class EncoderLayer(nn.Module):
    """``x + attn(LN(x))``, ``x + ffn(LN(x))``, then the task's adapter if the layer has adapters."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        ffn_dim: int,
        num_kv_heads: int | None = None,
        dropout: float = 0.0,
        rotary: bool = False,
        adapter_tasks: tuple[str, ...] = (),
        adapter_dim: int = 0,
    ) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, num_heads, num_kv_heads, dropout, rotary)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, ffn_dim, dropout)
        self.dropout = nn.Dropout(dropout)
        self.adapters = nn.ModuleDict({task: Adapter(d_model, adapter_dim) for task in adapter_tasks})

    def forward(
        self, x: torch.Tensor, key_mask: torch.Tensor | None, task: str | None = None
    ) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), key_mask))
        x = x + self.dropout(self.ffn(self.ffn_norm(x)))
        if len(self.adapters):
            if task not in self.adapters:
                raise KeyError(f"this layer has adapters for {list(self.adapters)}, not for task {task!r}")
            x = self.adapters[task](x)
        return x


class DecoderLayer(nn.Module):
    """Causal self-attention (cacheable), cross-attention to the encoder output, feed-forward."""

    #: methods besides ``forward`` that use the parameters: FSDP2 must gather them for these calls too
    fsdp_forward_methods = ("project_memory",)

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        ffn_dim: int,
        num_kv_heads: int | None = None,
        dropout: float = 0.0,
        rotary: bool = False,
    ) -> None:
        super().__init__()
        self.self_norm = nn.LayerNorm(d_model)
        self.self_attn = Attention(d_model, num_heads, num_kv_heads, dropout, rotary)
        self.cross_norm = nn.LayerNorm(d_model)
        self.cross_attn = Attention(d_model, num_heads, num_kv_heads, dropout, rotary=False)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, ffn_dim, dropout)
        self.dropout = nn.Dropout(dropout)

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-attention keys and values of the encoder output, computed once per target sequence."""
        return self.cross_attn.project_memory(memory)

    def forward(
        self,
        x: torch.Tensor,
        memory_kv: tuple[torch.Tensor, torch.Tensor],
        memory_mask: torch.Tensor | None,
        offset: int = 0,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.self_norm(x), causal=True, offset=offset, cache=cache))
        x = x + self.dropout(self.cross_attn(self.cross_norm(x), memory_mask, memory_kv=memory_kv))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))
