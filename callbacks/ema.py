"""``EMA``: an exponential moving average of a LightningModule's weights, as a callback.

Why not Lightning's ``EMAWeightAveraging`` (2.6)? It is built on ``torch.optim.swa_utils.AveragedModel``
with a per-tensor Python ``avg_fn`` (slow), has a fixed decay (no warmup), and after a delayed start it
validates on the never-updated initial copy (Lightning issue #21724). This callback keeps Lightning's good
ideas (update only when ``trainer.global_step`` advanced, so gradient accumulation updates once per
optimizer step; swap for validation and swap back before any checkpoint hook) and adds:

- timm's decay warmup (``ModelEmaV3``: ``1 - (1 + s / gamma) ** -power``, clamped to
  ``[min_decay, decay]``) and ``start_step``: the EMA starts as a copy of the weights at its first update,
  and validation uses the live weights until then;
- one fused multi-tensor update (``torch._foreach_lerp_``) over all parameters and float buffers;
- an optional CPU copy (``cpu=True``) to save accelerator memory;
- DDP: every rank keeps the same EMA; FSDP2 (``fully_shard``): each rank averages only its own shard (the
  local tensor of each DTensor), checkpoints hold the gathered full EMA, and a resumed run re-shards it
  (Lightning's callback does not support sharded models, its PR #21414);
- a checkpoint whose ``state_dict`` always holds the live weights (so resuming is exact and a checkpoint
  written during validation is never the swapped model) and whose callback state holds the EMA weights,
  restored bit for bit on resume; :meth:`EMA.export` writes a checkpoint carrying the EMA weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

__all__ = ["EMA", "ema_decay"]


def ema_decay(
    steps_since_start: int,
    decay: float,
    warmup: bool = False,
    warmup_gamma: float = 1.0,
    warmup_power: float = 2 / 3,
    min_decay: float = 0.0,
) -> float:
    """Decay used for an update ``steps_since_start`` optimizer steps after the EMA started.

    The first update (``steps_since_start == 0``) has decay 0: the EMA becomes a copy of the weights then,
    not at construction, which is what makes a delayed start correct. With ``warmup`` the decay follows
    timm's ``ModelEmaV3`` (power 2/3 reaches 0.999 after about 31k steps, 3/4 after about 10k).
    """
    if steps_since_start <= 0:
        return 0.0
    if not warmup:
        return decay
    value = 1.0 - (1.0 + steps_since_start / warmup_gamma) ** -warmup_power
    return max(min_decay, min(decay, value))


def _local(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2), the tensor itself otherwise: each rank averages its shard."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def _reshard(module: torch.nn.Module) -> None:
    """Put FSDP2 modules back in their sharded state: after an evaluation forward the root (which FSDP2 does
    not reshard after forward) still holds full, unsharded parameters, which must not be mixed with shards."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return
    for submodule in module.modules():
        if isinstance(submodule, FSDPModule):
            submodule.reshard()


@dataclass(frozen=True)
class _ShardLayout:
    """Where a local EMA shard sits in its full tensor (a DTensor's mesh, placements and global shape)."""

    mesh: Any
    placements: tuple
    shape: torch.Size
    stride: tuple[int, ...]
    device: torch.device

    @classmethod
    def of(cls, tensor: Tensor) -> _ShardLayout | None:
        if not hasattr(tensor, "to_local"):
            return None
        return cls(tensor.device_mesh, tuple(tensor.placements), tensor.shape, tensor.stride(), tensor.device)

    def as_dtensor(self, shard: Tensor) -> Tensor:
        from torch.distributed.tensor import DTensor

        local = shard.to(self.device)
        return DTensor.from_local(local, self.mesh, self.placements, shape=self.shape, stride=self.stride)

    def gather(self, shard: Tensor) -> Tensor:
        """The full tensor from every rank's shard (a collective: all ranks must call it)."""
        return self.as_dtensor(shard).full_tensor()

    def shard(self, full: Tensor) -> Tensor:
        """This rank's shard of a full tensor."""
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(self.device), self.mesh, list(self.placements)).to_local()


class EMA(Callback):
    """Exponential moving average of the module's weights; evaluates with them if asked.

    Args:
        decay: the EMA decay (the maximum one when ``warmup``).
        warmup: grow the decay with the step count as timm's ``ModelEmaV3`` does (see :func:`ema_decay`).
        warmup_gamma / warmup_power / min_decay: the warmup schedule's constants (timm's names).
        update_every_n_steps: update after every N-th optimizer step (counted from ``start_step``).
        start_step: optimizer steps to train before the EMA starts, as a copy of the weights after step
            ``start_step + 1`` (Lightning's ``update_starting_at_step``).
        evaluate_with_ema: run validation, test and predict on the EMA weights (once the EMA has started);
            the live weights come back afterwards, bit for bit.
        cpu: keep the EMA on the CPU (saves accelerator memory; each update copies the weights over).
        include_buffers: average float buffers (e.g. BatchNorm statistics) and copy the others; otherwise
            only parameters are tracked.
        copy_to_model_on_train_end: leave the EMA weights in the module when fitting ends (what Lightning's
            ``WeightAveraging`` always does); the default keeps the live weights.
    """

    def __init__(
        self,
        decay: float = 0.9999,
        warmup: bool = False,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        min_decay: float = 0.0,
        update_every_n_steps: int = 1,
        start_step: int = 0,
        evaluate_with_ema: bool = True,
        cpu: bool = False,
        include_buffers: bool = True,
        copy_to_model_on_train_end: bool = False,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if not 0.0 <= min_decay <= decay:
            raise ValueError(f"EMA min_decay must be in [0, decay={decay}], got {min_decay}")
        if update_every_n_steps < 1:
            raise ValueError(f"EMA update_every_n_steps must be >= 1, got {update_every_n_steps}")
        if start_step < 0:
            raise ValueError(f"EMA start_step must be >= 0, got {start_step}")
        if warmup_gamma <= 0 or warmup_power <= 0:
            raise ValueError(
                f"EMA warmup_gamma and warmup_power must be > 0, got {warmup_gamma}, {warmup_power}"
            )
        self.decay = decay
        self.warmup = warmup
        self.warmup_gamma = warmup_gamma
        self.warmup_power = warmup_power
        self.min_decay = min_decay
        self.update_every_n_steps = update_every_n_steps
        self.start_step = start_step
        self.evaluate_with_ema = evaluate_with_ema
        self.cpu = cpu
        self.include_buffers = include_buffers
        self.copy_to_model_on_train_end = copy_to_model_on_train_end

        self.names: list[str] = []
        self.ema: list[Tensor] = []  # aligned with self.names; float ones are averaged
        self.num_updates = 0
        self.last_update_step = -1  # trainer.global_step at the last update
        self._layouts: list[_ShardLayout | None] = []  # for DTensor (FSDP2) entries: how to gather/shard
        self._float_index: list[int] = []
        self._other_index: list[int] = []
        self._pending: dict[str, Any] | None = None  # state loaded before the module was ready
        self._backup: list[Tensor] | None = None  # live weights while the EMA is swapped in

    # ------------------------------------------------------------------ tensors
    @property
    def started(self) -> bool:
        return self.num_updates > 0

    @property
    def swapped(self) -> bool:
        """True while the EMA weights are in the module (validation/test/predict)."""
        return self._backup is not None

    def _named_live(self, pl_module: LightningModule) -> Iterator[tuple[str, Tensor]]:
        yield from pl_module.named_parameters()
        if self.include_buffers:
            yield from pl_module.named_buffers()

    def _live(self, pl_module: LightningModule) -> list[Tensor]:
        if any(layout is not None for layout in self._layouts):
            _reshard(pl_module)
        return [_local(t.detach()) for _, t in self._named_live(pl_module)]

    def _initialize(self, pl_module: LightningModule) -> None:
        """Allocate the EMA as a copy of the live weights, then apply any state loaded from a checkpoint."""
        if not self.names:
            named = list(self._named_live(pl_module))
            self.names = [name for name, _ in named]
            device = torch.device("cpu") if self.cpu else None
            self.ema = [_local(t.detach()).to(device=device, copy=True) for _, t in named]
            self._layouts = [_ShardLayout.of(t) for _, t in named]
            self._float_index = [i for i, t in enumerate(self.ema) if t.is_floating_point()]
            self._other_index = [i for i, t in enumerate(self.ema) if not t.is_floating_point()]
        if self._pending is not None:
            self._apply_state(self._pending)
            self._pending = None

    # ------------------------------------------------------------------- update
    def decay_at(self, global_step: int) -> float:
        """The decay used by an update after optimizer step ``global_step``."""
        return ema_decay(
            global_step - self.start_step - 1,
            self.decay,
            self.warmup,
            self.warmup_gamma,
            self.warmup_power,
            self.min_decay,
        )

    def should_update(self, global_step: int) -> bool:
        """Update after optimizer steps ``start_step + 1 + k * update_every_n_steps`` (Lightning's counting)."""
        since_start = global_step - self.start_step - 1
        return since_start >= 0 and since_start % self.update_every_n_steps == 0

    @torch.no_grad()
    def update(self, pl_module: LightningModule, decay: float) -> None:
        """``ema = decay * ema + (1 - decay) * live`` in one fused multi-tensor op (copy when decay is 0)."""
        live = self._live(pl_module)
        if self.cpu:  # a blocking copy: a non_blocking one to CPU could be read before it lands
            live = [t.to("cpu") for t in live]
        ema_f = [self.ema[i] for i in self._float_index]
        live_f = [live[i] for i in self._float_index]
        if decay == 0.0:
            torch._foreach_copy_(ema_f, live_f)
        else:
            torch._foreach_lerp_(ema_f, live_f, 1.0 - decay)
        if self._other_index:
            torch._foreach_copy_(
                [self.ema[i] for i in self._other_index], [live[i] for i in self._other_index]
            )
        self.num_updates += 1

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # After the strategy's setup: parameters are on their device and, under FSDP2, sharded.
        self._initialize(pl_module)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        # global_step advances only on a real optimizer step: with accumulate_grad_batches=k this fires
        # once per k micro-batches, and never twice for the same step.
        if step == self.last_update_step or not self.should_update(step):
            return
        self.update(pl_module, self.decay_at(step))
        self.last_update_step = step

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.copy_to_model_on_train_end and self.started:
            self.copy_to(pl_module)

    # --------------------------------------------------------------------- swap
    @torch.no_grad()
    def copy_to(self, pl_module: LightningModule) -> None:
        """Write the EMA weights into the module (e.g. before exporting it)."""
        torch._foreach_copy_(self._live(pl_module), self.ema)

    @torch.no_grad()
    def swap_in(self, pl_module: LightningModule) -> None:
        """Put the EMA weights into the module, keeping the live ones to restore."""
        if self.swapped:
            return
        live = self._live(pl_module)
        self._backup = [t.clone() for t in live]
        torch._foreach_copy_(live, self.ema)

    @torch.no_grad()
    def swap_out(self, pl_module: LightningModule) -> None:
        """Restore the live weights exactly."""
        if self._backup is None:
            return
        torch._foreach_copy_(self._live(pl_module), self._backup)
        self._backup = None

    def _eval_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._initialize(pl_module)
        if self.evaluate_with_ema and self.started:  # before the start the EMA *is* the live model
            self.swap_in(pl_module)

    def _eval_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.swap_out(pl_module)

    # Epoch-level hooks: the live weights are back before `on_validation_end`, where ModelCheckpoint saves.
    on_validation_epoch_start = _eval_start
    on_validation_epoch_end = _eval_end
    on_test_epoch_start = _eval_start
    on_test_epoch_end = _eval_end
    on_predict_epoch_start = _eval_start
    on_predict_epoch_end = _eval_end

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.swap_out(pl_module)

    # --------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        if self._pending is not None and not self.names:
            return dict(self._pending)
        # Under FSDP2 the shards are gathered: every rank takes part (Lightning dumps the checkpoint on
        # every rank), and the file holds the full EMA whatever the world size of the resumed run.
        full = [t if layout is None else layout.gather(t) for t, layout in zip(self.ema, self._layouts)]
        return {
            "names": list(self.names),
            "ema": [t.detach().clone().cpu() for t in full],
            "num_updates": self.num_updates,
            "last_update_step": self.last_update_step,
            "decay": self.decay,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Callbacks are restored before `on_fit_start`, when the module may not be on its device yet.
        self._pending = dict(state_dict)
        if self.names:
            self._apply_state(self._pending)
            self._pending = None

    @torch.no_grad()
    def _apply_state(self, state: dict[str, Any]) -> None:
        if list(state["names"]) != self.names:
            missing = sorted(set(self.names) - set(state["names"]))
            extra = sorted(set(state["names"]) - set(self.names))
            raise ValueError(
                f"EMA state in the checkpoint does not match the module: missing {missing[:5]}, "
                f"unexpected {extra[:5]}"
            )
        loaded = [
            full if layout is None else layout.shard(full)
            for full, layout in zip(state["ema"], self._layouts)
        ]
        torch._foreach_copy_(self.ema, [t.to(e.device) for t, e in zip(loaded, self.ema)])
        self.num_updates = int(state["num_updates"])
        self.last_update_step = int(state["last_update_step"])

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Guarantee the checkpoint's model weights are the live ones, even if saved while swapped."""
        if self._backup is None:
            return
        state = checkpoint["state_dict"]
        for name, live, layout in zip(self.names, self._backup, self._layouts):
            if name not in state:
                continue
            if layout is None:
                state[name] = live.clone()
            elif hasattr(state[name], "to_local"):  # a sharded checkpoint keeps DTensors
                state[name] = layout.as_dtensor(live.clone())
            else:
                state[name] = layout.gather(live)

    # ------------------------------------------------------------------- export
    @staticmethod
    def ema_state_dict(checkpoint: dict[str, Any] | str | Path) -> dict[str, Tensor]:
        """The EMA weights stored in a checkpoint (a dict or a path), keyed like the module's state dict."""
        if not isinstance(checkpoint, dict):
            checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
        states = [
            state
            for key, state in checkpoint.get("callbacks", {}).items()
            if key.startswith("EMA") and isinstance(state, dict) and "ema" in state
        ]
        if not states:
            raise ValueError("the checkpoint has no zoo.callbacks.EMA state (was EMA among the callbacks?)")
        if len(states) > 1:
            raise ValueError(f"the checkpoint has {len(states)} EMA states; load the one you need by key")
        if states[0]["num_updates"] == 0:
            rank_zero_warn("the EMA in this checkpoint never started: its weights are the initial ones")
        return dict(zip(states[0]["names"], states[0]["ema"]))

    @staticmethod
    def export(checkpoint_path: str | Path, output_path: str | Path) -> Path:
        """Write a copy of a checkpoint whose ``state_dict`` holds the EMA weights (for inference / release).

        The copy keeps hyper-parameters, so ``Module.load_from_checkpoint(output_path)`` gives the EMA model;
        training state (optimizer, loops, callbacks) is dropped, since resuming from EMA weights is wrong.
        The output is written to a temporary file first, so a failure never leaves a half-written file.
        """
        checkpoint_path, output_path = Path(checkpoint_path), Path(output_path)
        if checkpoint_path.resolve() == output_path.resolve():
            raise ValueError(f"refusing to overwrite the source checkpoint {str(checkpoint_path)!r}")
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        ema = EMA.ema_state_dict(checkpoint)
        state = dict(checkpoint["state_dict"])
        state.update({name: tensor for name, tensor in ema.items() if name in state})
        exported = {
            key: value
            for key, value in checkpoint.items()
            if key not in {"optimizer_states", "lr_schedulers", "loops", "callbacks", "state_dict"}
        }
        exported["state_dict"] = state
        tmp = output_path.with_name(output_path.name + ".tmp")
        torch.save(exported, tmp)
        tmp.replace(output_path)
        return output_path

    @property
    def state_key(self) -> str:
        return self._generate_state_key(decay=self.decay, start_step=self.start_step)
