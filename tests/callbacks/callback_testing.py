"""Tiny, deterministic modules and data for the callback tests (CPU, a few steps each); trainers come from
the root ``conftest``'s ``make_trainer``.

A plain module (not ``conftest``) so tests can import it; its name is unique across ``tests/``.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TinyClassifier(L.LightningModule):
    """An MLP with BatchNorm (float and integer buffers) that records its weights after every optimizer step."""

    def __init__(self, lr: float = 0.05, num_classes: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, num_classes))
        self.lr = lr
        self.snapshots: list[dict[str, torch.Tensor]] = []  # live state after each optimizer step
        self.seen_in_validation: list[tuple[int, dict[str, torch.Tensor]]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def distillation_targets(self, batch):
        x, y = batch
        return self(x), y

    def validation_step(self, batch, batch_idx):
        if batch_idx == 0:
            self.seen_in_validation.append((self.trainer.global_step, self.state_copy()))
        x, y = batch
        self.log("val/loss", F.cross_entropy(self(x), y))

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        self.snapshots.append(self.state_copy())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)

    def state_copy(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.state_dict().items()}


def tiny_loader(n: int = 64, batch_size: int = 8, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=generator)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)
