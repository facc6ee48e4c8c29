"""Shared test helpers: random weights for every parameter and a padded batch with <mask> tokens."""

from __future__ import annotations

import torch

SEQUENCES = [
    ("long", "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ<mask>PILSRVGDGTQDNLSGAEKAVQVKVKALPDAQ"),
    ("short", "MKV<mask>LAC"),
    ("mid", "ACDEFGHIKLMNPQRSTVWYXB<mask><mask>UZO"),
]


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Random values for every parameter and LayerNorm, so equivalence is not helped by init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * std
            param.copy_(1.0 + noise if "norm" in name.lower() and name.endswith("weight") else noise)
    return module.eval()
