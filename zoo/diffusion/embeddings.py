"""Embedding tables that grow by a few trainable rows: the new identifier of DreamBooth, the new token of
textual inversion.

Personalisation adds a concept to a trained model's vocabulary (a class id, a word) without disturbing the
entries it already has. ``ExtendedEmbedding`` keeps the trained table as it was (the same parameter, under
the same state-dict key, so a base checkpoint loads into it unchanged) and appends the new rows as a separate
parameter, ``extra``. Freezing the old rows is then ``weight.requires_grad_(False)``: no gradient masking,
and no optimizer (weight decay included) can touch them; diffusers' textual-inversion script gets the same
effect by restoring every other row from a copy after each step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ExtendedEmbedding", "extend_embedding"]


class ExtendedEmbedding(nn.Embedding):
    """``table``'s rows (``weight``, shared with ``table``) followed by ``new_rows`` (``extra``, trainable).

    ``num_embeddings`` counts both: ids ``table.num_embeddings`` onward look up the new rows.
    """

    def __init__(self, table: nn.Embedding, new_rows: torch.Tensor) -> None:
        if new_rows.ndim != 2 or new_rows.shape[1] != table.embedding_dim:
            raise ValueError(
                f"new rows must be (k, {table.embedding_dim}) for this table, got {tuple(new_rows.shape)}"
            )
        super().__init__(
            table.num_embeddings, table.embedding_dim, padding_idx=table.padding_idx, _weight=table.weight
        )
        self.weight = table.weight
        self.base_rows = table.num_embeddings
        self.extra = nn.Parameter(new_rows.detach().clone().to(table.weight))
        self.num_embeddings = self.base_rows + len(new_rows)

    def table(self) -> torch.Tensor:
        """All rows, old then new."""
        return torch.cat([self.weight, self.extra])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.table(), self.padding_idx)

    def extra_repr(self) -> str:
        return f"{self.base_rows} + {len(self.extra)}, {self.embedding_dim}"


def extend_embedding(parent: nn.Module, name: str, new_rows: torch.Tensor) -> ExtendedEmbedding:
    """Replace the ``nn.Embedding`` at ``parent.<name>`` (a dotted path) by an ``ExtendedEmbedding`` with
    ``new_rows`` appended; returns it."""
    *path, attribute = name.split(".")
    owner = parent.get_submodule(".".join(path)) if path else parent
    table = getattr(owner, attribute)
    if isinstance(table, ExtendedEmbedding) or not isinstance(table, nn.Embedding):
        raise TypeError(f"{name} is a {type(table).__name__}, not a plain nn.Embedding to extend")
    extended = ExtendedEmbedding(table, new_rows)
    setattr(owner, attribute, extended)
    return extended
