"""Contact precision: the standard unsupervised contact-prediction score of protein language models.

For each protein of length L, residue pairs (i < j) whose separation ``j - i`` lies in a range are
ranked by predicted contact probability; precision at L (P@L) is the share of true contacts among
the top L, P@L/5 among the top L/5 (at least one). Ranges follow the convention of the ESM papers
and CASP: short ``6 <= |i-j| < 12``, medium ``12 <= |i-j| < 24``, long ``|i-j| >= 24`` (the
figure usually quoted, e.g. ESM-2 650M long-range P@L 0.50 on its validation set). As in fair-esm's
evaluation, the denominator is the number of predictions asked for (L or L/5), even when fewer
pairs exist, and the score is averaged over proteins. Pairs whose target is negative (unknown,
padding) are not ranked.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

__all__ = ["CONTACT_RANGES", "ContactPrecision"]

#: name -> (minimum separation, maximum separation exclusive or None)
CONTACT_RANGES: dict[str, tuple[int, int | None]] = {"short": (6, 12), "medium": (12, 24), "long": (24, None)}


class ContactPrecision(Metric):
    """P@L and P@L/5 per separation range, averaged over proteins (``compute`` returns a dict).

    ``update(preds, target, lengths)``: ``preds`` (B, T, T) contact probabilities, ``target``
    (B, T, T) with 1 = contact, 0 = none, negative = unknown; ``lengths`` (B,) residues per protein
    (the rest of each row is padding).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, ranges: dict[str, tuple[int, int | None]] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ranges = dict(ranges or CONTACT_RANGES)
        self.keys = [f"P@{k}_{name}" for name in self.ranges for k in ("L", "L5")]
        self.add_state("total", torch.zeros(len(self.keys), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("proteins", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor) -> None:
        if preds.shape != target.shape or preds.ndim != 3:
            raise ValueError(
                f"preds {tuple(preds.shape)} and target {tuple(target.shape)} must both be (B, T, T)"
            )
        width = preds.shape[-1]
        i, j = torch.triu_indices(width, width, offset=1, device=preds.device)
        separation = j - i
        for row in range(preds.shape[0]):
            length = int(lengths[row])
            if length < 1:
                continue
            inside = j < length
            scores, truth = preds[row, i, j].float(), target[row, i, j]
            values = []
            for low, high in self.ranges.values():
                keep = inside & (separation >= low) & (truth >= 0)
                if high is not None:
                    keep &= separation < high
                ranked = truth[keep][torch.argsort(scores[keep], descending=True, stable=True)]
                for k in (length, max(1, length // 5)):
                    values.append((ranked[:k] > 0).sum().double() / k)
            self.total += torch.stack(values).to(self.total)
            self.proteins += 1

    def compute(self) -> dict[str, torch.Tensor]:
        mean = self.total / self.proteins.clamp(min=1)
        return {key: mean[n].float() for n, key in enumerate(self.keys)}
