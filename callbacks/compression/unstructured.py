"""Unstructured magnitude pruning with Zhu & Gupta's (2017) cubic schedule, on top of Lightning's ``ModelPruning``.

Reused: ``lightning.pytorch.callbacks.ModelPruning`` (parameter collection, local or global
``torch.nn.utils.prune`` L1 pruning, masks made permanent at the end of training and in every saved checkpoint,
so the checkpoints load into the plain model) and ``torch.nn.utils.prune`` (``weight_orig`` + ``weight_mask`` +
a forward pre-hook: the mask is re-applied on every forward, so pruned weights stay zero through optimizer
steps whatever the optimizer does to ``weight_orig``).

Added here: the schedule. Sparsity ramps from ``initial_sparsity`` to ``target_sparsity`` between ``start`` and
``end`` (epochs or optimizer steps) as ``s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (t_e - t_0))^3``, pruned
every ``frequency`` units. ``torch.nn.utils.prune`` takes the *fraction of the still-unpruned weights* to cut,
so each update asks for ``(s_t - s_now) / (1 - s_now)`` with ``s_now`` measured on the masks. The masks travel in
the callback's state (the checkpoint's weights have them folded in): a run resumed mid-schedule keeps the
pruned weights at zero and picks up where it was. ``ModelPruning``'s lottery-ticket reset defaults to True; it is off here (fine-tuning
continues from the trained weights, as in Zhu & Gupta). Only ``Linear``/``Conv`` weights are pruned
(``ModelPruning`` would also take norms and embeddings); :func:`sparsity_report` reports per layer and total.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelPruning
from torch import nn
from torch.nn.utils import prune

__all__ = ["MagnitudePruning", "cubic_sparsity", "sparsity_report"]

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def cubic_sparsity(t: int, start: int, end: int, initial: float, target: float) -> float:
    """Zhu & Gupta's schedule: ``initial`` before ``start``, ``target`` from ``end`` on, a cubic ramp between."""
    if t < start:
        return 0.0
    if t >= end:
        return target
    return target + (initial - target) * (1.0 - (t - start) / (end - start)) ** 3


def _effective_weight(module: nn.Module) -> torch.Tensor:
    if hasattr(module, "weight_mask"):
        return module.weight_orig * module.weight_mask
    return module.weight


def sparsity_report(module: nn.Module, layer_types: tuple[type[nn.Module], ...] = PRUNABLE) -> dict:
    """Fraction of zero weights per ``Linear``/``Conv`` layer (masks applied) and over all of them."""
    layers, zeros, total = {}, 0, 0
    for name, sub in module.named_modules():
        if not isinstance(sub, layer_types):
            continue
        weight = _effective_weight(sub).detach()
        n_zero, n = int((weight == 0).sum()), weight.numel()
        layers[name] = n_zero / n
        zeros, total = zeros + n_zero, total + n
    return {"layers": layers, "total": zeros / total if total else 0.0, "zeros": zeros, "weights": total}


class MagnitudePruning(ModelPruning):
    """Iterative magnitude pruning towards ``target_sparsity`` (cubic ramp), masks kept while fine-tuning.

    Args:
        target_sparsity: final fraction of zero weights (over all pruned layers when ``scope="global"``,
            in every layer when ``scope="layer"``).
        start / end: first and last pruning point, in ``unit`` (epochs, counted from 0, pruned at the epoch's
            end; or optimizer steps, pruned after that step). ``end == start`` prunes once.
        frequency: prune every ``frequency`` units between ``start`` and ``end``.
        unit: ``"epoch"`` or ``"step"``.
        scope: ``"global"`` (one magnitude threshold for all layers) or ``"layer"`` (each layer alone).
        initial_sparsity: sparsity at ``start`` (Zhu & Gupta's ``s_i``, usually 0).
        skip: module-name prefixes left dense (e.g. ``["model.head"]``: classifiers are small and sensitive).
        make_permanent: fold the masks into the weights at the end of training (and in every checkpoint).
    """

    def __init__(
        self,
        target_sparsity: float = 0.5,
        start: int = 0,
        end: int = 0,
        frequency: int = 1,
        unit: Literal["epoch", "step"] = "epoch",
        scope: Literal["global", "layer"] = "global",
        initial_sparsity: float = 0.0,
        skip: list[str] | None = None,
        make_permanent: bool = True,
        verbose: int = 0,
    ) -> None:
        if not 0.0 <= initial_sparsity <= target_sparsity < 1.0:
            raise ValueError(
                f"need 0 <= initial_sparsity <= target_sparsity < 1, got {initial_sparsity} and {target_sparsity}"
            )
        if end < start or frequency < 1:
            raise ValueError(f"need start <= end and frequency >= 1, got {start}, {end}, {frequency}")
        if unit not in ("epoch", "step") or scope not in ("global", "layer"):
            raise ValueError(
                f"unit must be 'epoch'/'step' and scope 'global'/'layer', got {unit!r}, {scope!r}"
            )
        super().__init__(
            pruning_fn="l1_unstructured",
            parameter_names=["weight"],
            use_global_unstructured=scope == "global",
            amount=self._amount,
            apply_pruning=(lambda epoch: self._is_pruning_point(epoch)) if unit == "epoch" else False,
            make_pruning_permanent=make_permanent,
            use_lottery_ticket_hypothesis=False,
            verbose=verbose,
        )
        self.target_sparsity, self.initial_sparsity = target_sparsity, initial_sparsity
        self.start, self.end, self.frequency, self.unit = start, end, frequency, unit
        self.skip = tuple(skip or ())
        self.report: dict = {}

    # ------------------------------------------------------------------ schedule
    def _is_pruning_point(self, t: int) -> bool:
        return self.start <= t <= self.end and ((t - self.start) % self.frequency == 0 or t == self.end)

    def _current_sparsity(self) -> float:
        zeros = total = 0
        for module, name in self._parameters_to_prune:
            mask = getattr(module, f"{name}_mask", None)
            weight = getattr(module, name)
            total += weight.numel()
            zeros += int((mask == 0).sum()) if mask is not None else 0
        return zeros / max(total, 1)

    def _amount(self, t: int) -> float:
        goal = cubic_sparsity(t, self.start, self.end, self.initial_sparsity, self.target_sparsity)
        now = self._current_sparsity()
        if goal <= now:
            return 0.0
        return min(1.0, (goal - now) / (1.0 - now))

    # ------------------------------------------------------------------ hooks
    def filter_parameters_to_prune(self, parameters_to_prune=()):
        names = {id(m): n for n, m in self._module.named_modules()} if hasattr(self, "_module") else {}
        kept = [
            (m, p)
            for m, p in parameters_to_prune
            if isinstance(m, PRUNABLE) and not any(names.get(id(m), "").startswith(s) for s in self.skip)
        ]
        if not kept:
            raise ValueError("MagnitudePruning found no Linear/Conv weight to prune (check skip)")
        return kept

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._module = pl_module
        super().setup(trainer, pl_module, stage)

    # ------------------------------------------------------------------ state
    def _mask_keys(self) -> list[tuple[str, nn.Module, str]]:
        names = {id(m): n for n, m in self._module.named_modules()} if hasattr(self, "_module") else {}
        return [(f"{names.get(id(m), '')}.{p}", m, p) for m, p in getattr(self, "_parameters_to_prune", ())]

    def state_dict(self) -> dict[str, Any]:
        """The current masks (bool, by parameter name). A checkpoint's weights have them folded in
        (``make_permanent``); without them a resumed run would train the pruned weights back to non-zero until
        the next pruning point, and measure its sparsity from zero."""
        masks = {}
        for key, module, name in self._mask_keys():
            mask = getattr(module, f"{name}_mask", None)
            if mask is not None:
                masks[key] = mask.detach().to("cpu", torch.bool)
        return {"masks": masks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_masks = state_dict.get("masks") or None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A resumed run's masks go back on the loaded weights here, once the optimizer holds its restored state:
        pruning re-registers each weight as ``weight_orig`` (the same tensor), which, done before the optimizer
        is built, would reorder its parameters against the checkpoint's optimizer state."""
        pending, self._pending_masks = getattr(self, "_pending_masks", None), None
        if not pending:
            return
        for key, module, name in self._mask_keys():
            if key in pending and getattr(module, f"{name}_mask", None) is None:
                weight = getattr(module, name)
                prune.custom_from_mask(module, name, pending[key].to(weight.device))

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args) -> None:
        step = trainer.global_step  # optimizer steps taken so far
        if self.unit != "step" or step == getattr(self, "_last_step", -1):
            return
        self._last_step = step
        if self._is_pruning_point(step - 1):
            amount = self._amount(step - 1)
            if amount > 0:
                self.apply_pruning(amount)
                self._log_report(pl_module, trainer.fit_loop.epoch_loop._batches_that_stepped)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        # Lightning logs an epoch's end under its last batch's step (one less than the batches that stepped)
        self._log_report(pl_module, max(trainer.fit_loop.epoch_loop._batches_that_stepped - 1, 0))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self.report = sparsity_report(pl_module)

    def _log_report(self, pl_module: LightningModule, step: int) -> None:
        """The sparsity, logged under the step Lightning logs the current batch's (or epoch end's) values at: a
        run resumed from a checkpoint written at the end of this step keeps the row (``zoo.loggers``)."""
        self.report = sparsity_report(pl_module)
        if pl_module._trainer is not None and pl_module.trainer.logger is not None:
            pl_module.trainer.logger.log_metrics({"pruning/sparsity": self.report["total"]}, step=step)
