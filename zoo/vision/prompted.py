"""Visual Prompt Tuning networks (Jia et al., ECCV 2022), written from the paper.

The official code is CC-BY-NC, so nothing here comes from it. A frozen timm backbone gets
learnable prompt tokens and a new linear head; only those train.

* ViT / DeiT (``PromptedViT``): ``p`` prompt tokens go after the prefix tokens (class, and
  distillation for DeiT) with no positional embedding. *Shallow*: inserted once, before the
  first block, and carried through. *Deep*: before every block the previous block's prompt
  outputs are replaced by that layer's own prompts.
* Swin (``PromptedSwin``): tokens live in local windows, so prompts join every window as extra
  keys and values of the window attention (zero relative-position bias, visible through the
  shifted-window mask). Because the prompt outputs of a deep-VPT layer are discarded anyway,
  this is the deep variant exactly; *shallow* puts prompts in the first block only.

The backbone is kept in eval mode even when Lightning calls ``.train()`` on the whole module,
so its dropout / drop-path stay off while prompts and head train.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PromptedSwin", "PromptedViT", "prompted_backbone"]


def _uniform_prompts(count: int, length: int, dim: int, patch_area: int) -> nn.Parameter:
    """VPT's "random" initialisation: U(-v, v), v = sqrt(6 / (3 * patch_area + dim))."""
    bound = math.sqrt(6.0 / float(3 * patch_area + dim))
    return nn.Parameter(torch.empty(count, length, dim).uniform_(-bound, bound))


class _FrozenBackboneMixin(nn.Module):
    """A frozen backbone (weights and eval mode), to which a subclass adds prompts and a head."""

    def __init__(self, backbone: nn.Module, num_prompts: int, deep: bool) -> None:
        super().__init__()
        if num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
        self.backbone = backbone
        self._freeze_backbone()  # before any prompt is attached inside it (Swin's windows)
        self.num_prompts, self.deep = num_prompts, deep
        self.patch_area = math.prod(backbone.patch_embed.patch_size)

    def _freeze_backbone(self) -> None:
        for param in self.backbone.parameters():
            param.requires_grad_(False)
        self.backbone.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


class PromptedViT(_FrozenBackboneMixin):
    """A frozen timm ``VisionTransformer`` (ViT, DeiT, DeiT-distilled) with VPT prompts and a new head."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        num_prompts: int = 10,
        deep: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(backbone, num_prompts, deep)
        layers = len(backbone.blocks) if deep else 1
        self.prompts = _uniform_prompts(layers, num_prompts, backbone.embed_dim, self.patch_area)
        self.prompt_dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.embed_dim, num_classes)

    def _prompts(self, layer: int, batch: int) -> torch.Tensor:
        return self.prompt_dropout(self.prompts[layer].expand(batch, -1, -1))

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        vit = self.backbone
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        prefix, p, batch = vit.num_prefix_tokens, self.num_prompts, images.shape[0]
        x = torch.cat([x[:, :prefix], self._prompts(0, batch), x[:, prefix:]], dim=1)
        for layer, block in enumerate(vit.blocks):
            if self.deep and layer > 0:
                x = torch.cat([x[:, :prefix], self._prompts(layer, batch), x[:, prefix + p :]], dim=1)
            x = block(x)
        return vit.norm(x)

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Class token (mean of class and distillation tokens for DeiT-distilled), or mean of patches."""
        vit = self.backbone
        prefix = vit.num_prefix_tokens
        pooled = tokens[:, :prefix].mean(dim=1) if prefix else tokens[:, self.num_prompts :].mean(dim=1)
        pooled = vit.fc_norm(pooled)
        return pooled if pre_logits else self.head(pooled)


class _PromptedWindowAttention(nn.Module):
    """Wraps a timm ``WindowAttention``: every window also attends to ``p`` learnable prompt tokens."""

    def __init__(
        self, attention: nn.Module, num_prompts: int, dim: int, patch_area: int, dropout: float
    ) -> None:
        super().__init__()
        self.attention = attention
        self.prompts = _uniform_prompts(1, num_prompts, dim, patch_area)
        self.prompt_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        attn = self.attention
        windows, n, _ = x.shape
        heads, p = attn.num_heads, self.prompts.shape[1]
        q, k, v = attn.qkv(x).reshape(windows, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        kv_dim = attn.qkv.out_features // 3
        weight = attn.qkv.weight[kv_dim:]
        bias = attn.qkv.bias[kv_dim:] if attn.qkv.bias is not None else None
        prompts = self.prompt_dropout(self.prompts[0])
        pk, pv = F.linear(prompts, weight, bias).reshape(p, 2, heads, -1).permute(1, 2, 0, 3).unbind(0)
        k = torch.cat([pk.expand(windows, -1, -1, -1), k], dim=2)
        v = torch.cat([pv.expand(windows, -1, -1, -1), v], dim=2)
        bias_mask = F.pad(attn._get_rel_pos_bias(), (p, 0))  # prompts: no relative-position bias
        if mask is not None:
            num_win = mask.shape[0]
            padded = F.pad(mask, (p, 0)).view(1, num_win, 1, n, n + p)
            bias_mask = (bias_mask.unsqueeze(1) + padded).reshape(-1, heads, n, n + p)
            bias_mask = bias_mask.repeat(windows // num_win, 1, 1, 1)
        dropout = attn.attn_drop.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias_mask, dropout_p=dropout)
        return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(windows, n, -1)))


class PromptedSwin(_FrozenBackboneMixin):
    """A frozen timm ``SwinTransformer`` with per-window VPT prompts and a new head."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        num_prompts: int = 10,
        deep: bool = False,
        dropout: float = 0.0,
    ) -> None:
        from timm.models.swin_transformer import SwinTransformerBlock

        super().__init__(backbone, num_prompts, deep)
        blocks = [m for m in backbone.modules() if isinstance(m, SwinTransformerBlock)]
        for block in blocks if deep else blocks[:1]:
            dim = block.norm1.normalized_shape[0]
            block.attn = _PromptedWindowAttention(block.attn, num_prompts, dim, self.patch_area, dropout)
        self.head = nn.Linear(backbone.num_features, num_classes)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(images)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = self.backbone.forward_head(features, pre_logits=True)
        return pooled if pre_logits else self.head(pooled)


def prompted_backbone(backbone: nn.Module, num_classes: int, num_prompts: int, deep: bool, dropout: float):
    """Pick the VPT wrapper for a timm backbone, or say which backbones are supported."""
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(backbone, VisionTransformer):
        return PromptedViT(backbone, num_classes, num_prompts, deep, dropout)
    if isinstance(backbone, SwinTransformer):
        return PromptedSwin(backbone, num_classes, num_prompts, deep, dropout)
    raise TypeError(
        f"VPT needs a timm VisionTransformer or SwinTransformer backbone, got {type(backbone).__name__}"
    )
