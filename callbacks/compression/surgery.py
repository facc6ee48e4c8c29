"""Transformer layer surgery: rebuild attention and feed-forward layers with fewer heads and hidden units.

``torch.nn.utils.prune`` only masks; here the ``nn.Linear`` layers are replaced by smaller ones and the
modules' head counts lowered, so their own ``forward`` runs unchanged on less work. Three attention layouts
are recognised, which covers every transformer in the zoo (and most others):

- fused ``qkv`` + ``proj`` (timm ``Attention``: ViT, DeiT, VPT; also its optional ``gate`` and ``norm``),
- separate ``q_proj``/``k_proj``/``v_proj`` + ``out_proj`` (ESM-2, fair-esm, Hugging Face style),
- ``q_proj`` + fused ``kv_proj`` + ``out_proj`` with ``num_kv_heads`` (the multitask Transformer, GQA).

The prunable unit of attention is a key/value head with the query heads that share it (one head each
without grouped-query attention), so grouped layouts stay valid. A feed-forward layer is any module with
``fc1``/``fc2`` linears around one hidden width (timm ``Mlp``, ESM-2 layers, the multitask ``FeedForward``).

Modules whose other layers read per-head outputs (ESM-2's contact head regresses on every head's attention
map) define ``after_head_pruning(kept)``; it is called with the kept units of each attention module below
it, named relative to it, so they can shrink to match.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "HeadLayout",
    "attention_layout",
    "attention_modules",
    "drop_blocks",
    "feed_forward_modules",
    "head_channels",
    "notify_head_pruning",
    "prune_attention_heads",
    "prune_mlp_units",
    "select_columns",
    "select_rows",
    "unit_slices",
]


def _rebuild(linear: nn.Linear, weight: Tensor, bias: Tensor | None) -> nn.Linear:
    new = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.train(linear.training)
    return new


def select_rows(linear: nn.Linear, rows: Tensor) -> nn.Linear:
    """A copy of ``linear`` with only output features ``rows``."""
    bias = linear.bias.detach()[rows] if linear.bias is not None else None
    return _rebuild(linear, linear.weight.detach()[rows], bias)


def select_columns(linear: nn.Linear, columns: Tensor) -> nn.Linear:
    """A copy of ``linear`` with only input features ``columns``."""
    bias = linear.bias.detach() if linear.bias is not None else None
    return _rebuild(linear, linear.weight.detach()[:, columns], bias)


def _select_norm(norm: nn.Module, keep: Tensor) -> None:
    if isinstance(norm, nn.LayerNorm):
        norm.normalized_shape = (len(keep),)
        if norm.weight is not None:
            norm.weight = nn.Parameter(norm.weight.detach()[keep].clone())
        if norm.bias is not None:
            norm.bias = nn.Parameter(norm.bias.detach()[keep].clone())
    elif not isinstance(norm, nn.Identity):
        raise TypeError(f"cannot prune through a {type(norm).__name__} normalisation")


# -------------------------------------------------------------------------------------------- attention
@dataclass(frozen=True)
class HeadLayout:
    """Where one attention class keeps its heads.

    ``query_rows``/``kv_rows``: linears whose output features are ``(parts, units, width)`` blocks, as
    ``(attribute, parts)``; query rows are ``group * head_dim`` wide per unit, key/value rows ``head_dim``.
    ``columns``: the output projection, whose input features are ``(units, group * head_dim)``.
    ``hidden_norm``: an optional norm over the attention's inner width (timm's ``norm``).
    """

    name: str
    query_rows: tuple[tuple[str, int], ...]
    kv_rows: tuple[tuple[str, int], ...]
    columns: str
    hidden_norm: str | None = None


TIMM_FUSED = HeadLayout("fused qkv", query_rows=(("qkv", 3), ("gate", 1)), kv_rows=(), columns="proj",
                        hidden_norm="norm")  # fmt: skip
SEPARATE = HeadLayout("separate q/k/v", query_rows=(("q_proj", 1), ("k_proj", 1), ("v_proj", 1)), kv_rows=(),
                      columns="out_proj")  # fmt: skip
FUSED_KV = HeadLayout(
    "q + fused kv", query_rows=(("q_proj", 1),), kv_rows=(("kv_proj", 2),), columns="out_proj"
)


def _is_linear(module: nn.Module, attribute: str) -> bool:
    return isinstance(getattr(module, attribute, None), nn.Linear)


def attention_layout(module: nn.Module) -> HeadLayout | None:
    """The layout of an attention module, or None if ``module`` is not one this file can prune."""
    if not (
        isinstance(getattr(module, "num_heads", None), int)
        and isinstance(getattr(module, "head_dim", None), int)
    ):
        return None
    if _is_linear(module, "qkv") and _is_linear(module, "proj"):
        return TIMM_FUSED
    if all(_is_linear(module, a) for a in ("q_proj", "k_proj", "v_proj", "out_proj")):
        return SEPARATE
    if all(_is_linear(module, a) for a in ("q_proj", "kv_proj", "out_proj")):
        return FUSED_KV
    return None


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every prunable attention module of ``model``, by qualified name."""
    return [(name, m) for name, m in model.named_modules() if attention_layout(m) is not None]


def _units(attn: nn.Module) -> tuple[int, int]:
    """(prunable units, query heads per unit): key/value heads and their group size."""
    kv_heads = getattr(attn, "num_kv_heads", None) or attn.num_heads
    return kv_heads, attn.num_heads // kv_heads


def head_channels(units: Tensor, width: int, parts: int, total_units: int) -> Tensor:
    """Feature indices ``(parts, len(units), width)`` of ``units`` in a ``(parts, total_units, width)`` layout."""
    within = units[:, None] * width + torch.arange(width)
    return torch.stack([within + part * total_units * width for part in range(parts)])


def _per_unit(channels: Tensor) -> Tensor:
    """``(parts, units, width)`` indices regrouped as ``(units, parts * width)``: one row per unit."""
    return channels.transpose(0, 1).flatten(1)


def unit_slices(attn: nn.Module) -> list[tuple[Tensor, Tensor | None]]:
    """Each unit's weights (and gradients, if any) as ``(units, ...)`` tensors: what importance scores read."""
    layout = attention_layout(attn)
    count, group = _units(attn)
    all_units = torch.arange(count)
    slices = []
    for attributes, width in ((layout.query_rows, group * attn.head_dim), (layout.kv_rows, attn.head_dim)):
        for attribute, parts in attributes:
            linear = getattr(attn, attribute, None)
            if not isinstance(linear, nn.Linear):
                continue
            rows = _per_unit(head_channels(all_units, width, parts, count)).to(linear.weight.device)
            for tensor in (linear.weight, linear.bias):
                if tensor is not None:
                    grad = tensor.grad[rows] if tensor.grad is not None else None
                    slices.append((tensor.detach()[rows], grad))
    out = getattr(attn, layout.columns)
    columns = _per_unit(head_channels(all_units, group * attn.head_dim, 1, count)).to(out.weight.device)
    grad = out.weight.grad[:, columns].transpose(0, 1) if out.weight.grad is not None else None
    slices.append((out.weight.detach()[:, columns].transpose(0, 1), grad))
    return slices


def prune_attention_heads(attn: nn.Module, keep: Sequence[int]) -> None:
    """Keep only units ``keep`` (heads, or key/value groups under grouped-query attention) of ``attn``."""
    layout = attention_layout(attn)
    if layout is None:
        raise TypeError(f"{type(attn).__name__} is not an attention layout that can be pruned")
    count, group = _units(attn)
    keep_t = torch.as_tensor(sorted(keep), dtype=torch.long)
    if len(keep_t) == 0 or keep_t.max() >= count or keep_t.min() < 0:
        raise ValueError(f"keep must name between 1 and {count} of the {count} heads, got {list(keep)}")
    for attributes, width in ((layout.query_rows, group * attn.head_dim), (layout.kv_rows, attn.head_dim)):
        for attribute, parts in attributes:
            if _is_linear(attn, attribute):
                rows = head_channels(keep_t, width, parts, count).flatten()
                setattr(attn, attribute, select_rows(getattr(attn, attribute), rows))
    inner = head_channels(keep_t, group * attn.head_dim, 1, count).flatten()
    setattr(attn, layout.columns, select_columns(getattr(attn, layout.columns), inner))
    if layout.hidden_norm and hasattr(attn, layout.hidden_norm):
        _select_norm(getattr(attn, layout.hidden_norm), inner)
    attn.num_heads = len(keep_t) * group
    if getattr(attn, "num_kv_heads", None):
        attn.num_kv_heads = len(keep_t)
    if hasattr(attn, "attn_dim"):
        attn.attn_dim = attn.num_heads * attn.head_dim


def notify_head_pruning(model: nn.Module, kept: dict[str, list[int]]) -> None:
    """Call ``after_head_pruning`` on every module that defines it, with the kept units below it."""
    for prefix, module in model.named_modules():
        hook = getattr(module, "after_head_pruning", None)
        if not callable(hook):
            continue
        start = f"{prefix}." if prefix else ""
        hook({name[len(start) :]: keep for name, keep in kept.items() if name.startswith(start)})


# ------------------------------------------------------------------------------------------ feed-forward
def _is_feed_forward(module: nn.Module) -> bool:
    fc1, fc2 = getattr(module, "fc1", None), getattr(module, "fc2", None)
    return isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear) and fc1.out_features == fc2.in_features


def feed_forward_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every module with an ``fc1 -> fc2`` hidden layer, by qualified name."""
    return [(name, m) for name, m in model.named_modules() if _is_feed_forward(m)]


def prune_mlp_units(mlp: nn.Module, keep: Sequence[int]) -> None:
    """Keep only hidden units ``keep`` of an ``fc1 -> fc2`` layer (fc1 rows, fc2 columns, timm's hidden norm)."""
    hidden = mlp.fc1.out_features
    keep_t = torch.as_tensor(sorted(keep), dtype=torch.long)
    if len(keep_t) == 0 or keep_t.max() >= hidden or keep_t.min() < 0:
        raise ValueError(f"keep must name between 1 and {hidden} hidden units")
    mlp.fc1 = select_rows(mlp.fc1, keep_t)
    norm = getattr(mlp, "norm", None)  # timm's optional norm over the hidden units
    if isinstance(norm, nn.Identity) or (
        isinstance(norm, nn.LayerNorm) and norm.normalized_shape == (hidden,)
    ):
        _select_norm(norm, keep_t)
    mlp.fc2 = select_columns(mlp.fc2, keep_t)


def drop_blocks(model: nn.Module, container: str, keep: Sequence[int]) -> None:
    """Keep only the blocks ``keep`` of the ``nn.Sequential`` named ``container`` (e.g. ``model.blocks``)."""
    blocks = model.get_submodule(container)
    if not isinstance(blocks, nn.Sequential):
        raise TypeError(f"{container!r} is a {type(blocks).__name__}; layer dropping needs an nn.Sequential")
    kept = [blocks[i] for i in sorted(keep)]
    parent_name, _, attribute = container.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attribute, nn.Sequential(*kept))
