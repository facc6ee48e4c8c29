"""DETR-style decoder over the BEV: object queries, deformable attention into the BEV, box refinement.

Each layer (post-norm): self-attention among the object queries (positions added to queries and keys) ->
norm -> deformable cross-attention into the BEV map around each query's reference point -> norm -> FFN ->
norm. After each layer the head's regression branch of that layer moves the reference point
(``sigmoid(delta + logit(reference))``, detached before the next layer): iterative box refinement.
"""

from __future__ import annotations

import torch
from torch import nn

from zoo.bev.deformable import MultiScaleDeformableAttention
from zoo.bev.encoder import FeedForward

__all__ = ["DetectionDecoder", "DetectionDecoderLayer", "inverse_sigmoid"]


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class DetectionDecoderLayer(nn.Module):
    def __init__(self, embed_dims: int, num_heads: int, ffn_dims: int, num_points: int, dropout: float = 0.1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(embed_dims, num_heads, dropout=dropout, batch_first=True)
        self.cross_attn = MultiScaleDeformableAttention(
            embed_dims, num_heads, num_levels=1, num_points=num_points
        )
        self.dropout = nn.Dropout(dropout)
        self.ffn = FeedForward(embed_dims, ffn_dims, dropout)
        self.norms = nn.ModuleList(nn.LayerNorm(embed_dims) for _ in range(3))

    def forward(self, query, query_pos, bev, bev_shape, reference_xy) -> torch.Tensor:
        q = query + query_pos
        query = self.norms[0](query + self.self_attn(q, q, query, need_weights=False)[0])
        attended = self.cross_attn(query + query_pos, bev, reference_xy[:, :, None, :], [bev_shape])
        query = self.norms[1](query + self.dropout(attended))
        return self.norms[2](self.ffn(query))


class DetectionDecoder(nn.Module):
    """Runs the layers and refines the (x, y, z) reference after each; returns every layer's output."""

    def __init__(self, num_layers: int, **layer_kwargs) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DetectionDecoderLayer(**layer_kwargs) for _ in range(num_layers))

    def forward(
        self,
        query: torch.Tensor,
        query_pos: torch.Tensor,
        bev: torch.Tensor,
        bev_shape: tuple[int, int],
        reference: torch.Tensor,
        reg_branches: nn.ModuleList,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``reference`` (B, Q, 3) normalised; returns per layer the queries and the references they used."""
        outputs, references = [], []
        for layer, branch in zip(self.layers, reg_branches):
            query = layer(query, query_pos, bev, bev_shape, reference[..., :2])
            outputs.append(query)
            references.append(reference)
            delta = branch(query)
            refined = torch.cat([delta[..., 0:2], delta[..., 2:3]], -1) + inverse_sigmoid(reference)
            reference = refined.sigmoid().detach()
        return outputs, references
