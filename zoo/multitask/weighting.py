"""Task weighting: how per-task losses become the one loss that is back-propagated.

Every method is a ``TaskWeighting`` (an ``nn.Module``, so its learnable parameters and its
history buffers are saved in checkpoints and a resumed run continues exactly):

- ``StaticWeighting``: the declared ``loss_weight`` of each task.
- ``UncertaintyWeighting`` (Kendall, Gal & Cipolla, CVPR 2018): learnable ``s_i = log sigma_i^2``;
  ``c_i e^{-s_i} L_i + s_i / 2`` with ``c_i = 1/2`` for regression, 1 for classification-like tasks.
- ``DynamicWeightAverage`` (Liu, Johns & Davison, CVPR 2019): ``w_k = K softmax_k(r_k / T)``,
  ``r_k = L_k(t-1) / L_k(t-2)`` on epoch-averaged training losses, ``T = 2``; 1 in the first two epochs.
- ``GradNorm`` (Chen et al., ICML 2018): learnable ``w_i`` trained on
  ``sum_i |G_i - mean(G) r_i^alpha|`` with ``G_i = ||grad_W w_i L_i||`` on the last shared layer's
  weight ``W`` and ``r_i`` the inverse training rate; ``alpha = 1.5``; renormalised to sum to the
  task count after every optimizer step.
- ``LossTrend``: raises the weight of a task whose epoch loss stopped falling (no relative
  improvement above ``tolerance`` over ``patience`` epochs), then renormalises to the task count.

Adaptive weights multiply the declared ``loss_weight`` (a prior), so ``loss_weight: 0`` still
switches a task off. ``weights()`` returns the effective coefficient of each task's loss.

A weighting keeps each constructor argument as an attribute of the same name, so ``config()`` can
say how to build it again (checkpoints record it; ``weighting_from_config`` reads it back).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch
from torch import nn

from zoo.multitask.tasks import REGRESSION, TaskSpec

__all__ = [
    "DynamicWeightAverage",
    "GradNorm",
    "LossTrend",
    "StaticWeighting",
    "TaskWeighting",
    "UncertaintyWeighting",
    "weighting_from_config",
]


class TaskWeighting(nn.Module):
    """Base class. ``bind`` is called once with the tasks, before the optimizer is built."""

    #: learning rate of this method's own parameters (None: the optimizer's)
    lr: float | None = None

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def bind(self, tasks: list[TaskSpec]) -> None:
        self.names = [t.name for t in tasks]
        self.register_buffer("prior", torch.tensor([t.loss_weight for t in tasks], dtype=torch.float32))
        self.build(tasks)

    def build(self, tasks: list[TaskSpec]) -> None:
        """Create parameters and buffers that depend on the task list."""

    @property
    def num_tasks(self) -> int:
        return len(self.names)

    def config(self) -> dict[str, Any]:
        """``{"class_path", "init_args"}``: how to build this weighting again (before ``bind``)."""
        cls = type(self)
        names = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
        return {
            "class_path": f"{cls.__module__}.{cls.__qualname__}",
            "init_args": {name: getattr(self, name) for name in names},
        }

    def coefficients(self) -> torch.Tensor:
        """Effective weight of each task's loss, in task order (no gradient)."""
        return self.prior

    def weights(self) -> dict[str, float]:
        return dict(zip(self.names, self.coefficients().detach().float().tolist()))

    def forward(
        self, losses: dict[str, torch.Tensor], shared_parameter: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The loss to back-propagate from the tasks present in this step."""
        coefficients = self.coefficients().detach()
        return sum(coefficients[self.names.index(name)] * loss for name, loss in losses.items())

    def epoch_end(self, epoch_losses: dict[str, float]) -> None:
        """Epoch-averaged training loss of each task (all ranks), for history-based methods."""

    def after_optimizer_step(self) -> None:
        """Projection after each optimizer step (GradNorm's renormalisation)."""

    def parameter_group(self) -> dict | None:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            return None
        group = {"params": params, "weight_decay": 0.0}
        if self.lr is not None:
            group["lr"] = self.lr
        return group


class StaticWeighting(TaskWeighting):
    """The declared ``loss_weight`` of each task, unchanged."""


class UncertaintyWeighting(TaskWeighting):
    """Homoscedastic-uncertainty weighting; the log-variances train with the model (no weight decay)."""

    def __init__(self, init_log_variance: float = 0.0, lr: float | None = None) -> None:
        super().__init__()
        self.init_log_variance = init_log_variance
        self.lr = lr

    def build(self, tasks: list[TaskSpec]) -> None:
        self.log_variances = nn.Parameter(torch.full((len(tasks),), float(self.init_log_variance)))
        self.register_buffer("scale", torch.tensor([0.5 if t.type == REGRESSION else 1.0 for t in tasks]))

    def coefficients(self) -> torch.Tensor:
        return self.prior * self.scale * torch.exp(-self.log_variances)

    def forward(self, losses, shared_parameter=None):
        coefficients = self.coefficients()
        total = 0.0
        for name, loss in losses.items():
            i = self.names.index(name)
            total = total + coefficients[i] * loss + 0.5 * self.log_variances[i]
        return total


class DynamicWeightAverage(TaskWeighting):
    """DWA: weights from the ratio of the last two epochs' average losses, softened by ``temperature``."""

    def __init__(self, temperature: float = 2.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"DWA temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def build(self, tasks):
        self.register_buffer("history", torch.zeros(2, len(tasks)))  # [t-2, t-1]
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("current", torch.ones(len(tasks)))

    def coefficients(self):
        return self.prior * self.current

    def epoch_end(self, epoch_losses):
        losses = torch.tensor(
            [epoch_losses.get(n, float("nan")) for n in self.names], device=self.history.device
        )
        losses = torch.where(
            torch.isnan(losses), self.history[1], losses
        )  # a task absent this epoch keeps its value
        self.history.copy_(torch.stack([self.history[1], losses]))
        self.epochs_seen += 1
        if int(self.epochs_seen) >= 2:
            ratio = self.history[1] / self.history[0].clamp(min=1e-12)
            self.current.copy_(self.num_tasks * torch.softmax(ratio / self.temperature, dim=0))


class GradNorm(TaskWeighting):
    """GradNorm on the last shared layer's weight; ``lr`` is the weights' own learning rate."""

    def __init__(self, alpha: float = 1.5, lr: float | None = 0.025, min_weight: float = 1e-3) -> None:
        super().__init__()
        self.alpha = alpha
        self.lr = lr
        self.min_weight = min_weight

    def build(self, tasks):
        self.task_weights = nn.Parameter(torch.ones(len(tasks)))
        self.register_buffer("initial_losses", torch.zeros(len(tasks)))
        self.register_buffer("has_initial", torch.zeros(len(tasks), dtype=torch.bool))

    def coefficients(self):
        return self.prior * self.task_weights

    def forward(self, losses, shared_parameter=None):
        if shared_parameter is None:
            raise ValueError("GradNorm needs the last shared layer's weight (shared_parameter)")
        index = torch.tensor([self.names.index(n) for n in losses], device=self.task_weights.device)
        loss_vec = torch.stack([losses[n] for n in losses]).float()
        with torch.no_grad():  # L_i(0): the first loss seen for each task
            fresh = ~self.has_initial[index]
            self.initial_losses[index] = torch.where(fresh, loss_vec.detach(), self.initial_losses[index])
            self.has_initial[index] = True
        weights = self.coefficients()[index]
        task_loss = (weights.detach() * loss_vec).sum()
        if not self.training or not torch.is_grad_enabled() or len(losses) < 2:
            return task_loss
        norms = torch.stack(
            [
                torch.autograd.grad(losses[n], shared_parameter, retain_graph=True)[0].float().norm()
                for n in losses
            ]
        )
        grad_norms = weights * norms  # G_i = ||grad_W (w_i L_i)|| = w_i ||grad_W L_i||
        with torch.no_grad():
            ratios = loss_vec.detach() / self.initial_losses[index].clamp(min=1e-12)
            rates = ratios / ratios.mean()
            target = grad_norms.mean() * rates**self.alpha
        gradnorm_loss = (grad_norms - target).abs().sum()
        return task_loss + gradnorm_loss

    @torch.no_grad()
    def after_optimizer_step(self):
        w = self.task_weights.clamp_(min=self.min_weight)
        w.mul_(self.num_tasks / w.sum())


class LossTrend(TaskWeighting):
    """Boost (``x boost``) a task whose epoch loss has stalled, then renormalise to the task count.

    A task is stalled when its best loss of the last ``patience`` epochs is not ``tolerance``
    (relative) below its loss ``patience`` epochs earlier. Tasks already below
    ``converged_loss`` are left alone, and no weight exceeds ``max_weight``.
    """

    def __init__(
        self,
        patience: int = 2,
        tolerance: float = 0.01,
        boost: float = 1.5,
        max_weight: float = 3.0,
        converged_loss: float = 1e-3,
    ) -> None:
        super().__init__()
        if patience < 1 or boost <= 1 or max_weight <= 0:
            raise ValueError("LossTrend needs patience >= 1, boost > 1 and max_weight > 0")
        self.patience, self.tolerance, self.boost = patience, tolerance, boost
        self.max_weight, self.converged_loss = max_weight, converged_loss

    def build(self, tasks):
        self.register_buffer("history", torch.full((self.patience + 1, len(tasks)), float("nan")))
        self.register_buffer("current", torch.ones(len(tasks)))

    def coefficients(self):
        return self.prior * self.current

    def stalled(self) -> torch.Tensor:
        """Per task: True if the loss stopped falling over the window (False until the window is full)."""
        past, recent = self.history[0], self.history[1:].amin(0)
        full = ~torch.isnan(self.history).any(0)
        return full & (recent > (1 - self.tolerance) * past) & (recent > self.converged_loss)

    def epoch_end(self, epoch_losses):
        losses = torch.tensor(
            [epoch_losses.get(n, float("nan")) for n in self.names], device=self.history.device
        )
        self.history.copy_(torch.cat([self.history[1:], losses[None]]))
        stalled = self.stalled()
        if stalled.any():
            boosted = torch.where(stalled, self.current * self.boost, self.current)
            boosted = boosted * (self.num_tasks / boosted.sum())
            self.current.copy_(boosted.clamp(max=self.max_weight))


def weighting_from_config(config: dict[str, Any]) -> TaskWeighting:
    """The weighting ``TaskWeighting.config()`` describes (unbound)."""
    module, _, name = config["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name, None)
    if not (isinstance(cls, type) and issubclass(cls, TaskWeighting)):
        raise ValueError(f"{config['class_path']!r} is not a TaskWeighting")
    return cls(**config["init_args"])
