"""Optimisation pieces shared by every family: parameter groups and the default LR schedule.

Layer-wise LR decay is applied by scaling each parameter group's ``lr`` when the optimizer
is built, so it holds under *any* ``torch.optim.lr_scheduler`` (timm stores an ``lr_scale``
that only timm's own schedulers read, and is silently ignored elsewhere).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["WarmupCosineLR", "apply_lr_scales", "layer_decay_groups", "weight_decay_groups"]


def _declared_no_weight_decay(model: nn.Module) -> set[str]:
    """Full names of parameters that any submodule lists in timm's ``no_weight_decay()``."""
    names = set()
    for prefix, module in model.named_modules():
        if hasattr(module, "no_weight_decay"):
            names.update(f"{prefix}.{name}" if prefix else name for name in module.no_weight_decay())
    return names


def weight_decay_groups(model: nn.Module) -> list[dict]:
    """Split trainable parameters into a decayed group and a ``weight_decay=0`` group.

    Biases, norm weights (every parameter of rank <= 1) and tokens a submodule lists in
    ``no_weight_decay()`` (class/position embeddings in timm) are not decayed. The decayed group
    carries no ``weight_decay`` key, so the optimizer's own value (from YAML) applies to it.
    """
    declared = _declared_no_weight_decay(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name in declared else decay).append(param)
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def layer_decay_groups(model: nn.Module, layer_decay: float) -> list[dict]:
    """timm's layer-wise grouping (``group_matcher``), with ``lr_scale`` per group.

    Groups that timm gives the default decay lose their ``weight_decay`` key so the optimizer's
    value from YAML applies; only ``weight_decay=0`` groups keep it.
    """
    from timm.optim import param_groups_layer_decay

    sentinel = 1.0
    groups = param_groups_layer_decay(
        model,
        weight_decay=sentinel,
        no_weight_decay_list=_declared_no_weight_decay(model),
        layer_decay=layer_decay,
    )
    for group in groups:
        if group.get("weight_decay") == sentinel:
            del group["weight_decay"]
    return groups


def apply_lr_scales(optimizer: torch.optim.Optimizer) -> None:
    """Bake each group's ``lr_scale`` into its ``lr`` before any scheduler records ``initial_lr``."""
    for group in optimizer.param_groups:
        scale = group.pop("lr_scale", None)
        if scale is not None:
            group["lr"] = group["lr"] * scale


class WarmupCosineLR(LRScheduler):
    """Linear warm-up, then cosine decay to ``min_lr_ratio * base_lr``; stepped once per optimizer step.

    ``warmup_steps`` may be a count or a fraction of the run. ``total_steps=None`` means "the whole
    run": ``ZooModule.configure_optimizers`` fills it in from ``trainer.estimated_stepping_batches``,
    so a YAML file never has to repeat the number of epochs or the dataset size.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: float = 0.05,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, last_epoch)

    def set_total_steps(self, total_steps: int) -> None:
        """Fix the run length after construction and re-apply the current step's learning rate."""
        self.total_steps = max(int(total_steps), 1)
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr

    def _warmup_count(self) -> int:
        if isinstance(self.warmup_steps, float) and self.warmup_steps < 1.0:
            return int(self.warmup_steps * self.total_steps) if self.total_steps else 0
        return int(self.warmup_steps)

    def lr_factor(self, step: int) -> float:
        warmup = self._warmup_count()
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if not self.total_steps:
            return 1.0
        progress = min((step - warmup) / max(self.total_steps - warmup, 1), 1.0)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine

    def get_lr(self) -> list[float]:
        factor = self.lr_factor(max(self.last_epoch, 0))
        return [base_lr * factor for base_lr in self.base_lrs]
