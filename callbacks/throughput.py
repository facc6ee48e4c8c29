"""Samples/s, tokens/s, TFLOP/s and MFU for any module, with nothing to declare: Lightning's
``ThroughputMonitor`` with the FLOPs counted on the first real batch of each stage.

Lightning's monitor reads ``pl_module.flops_per_batch`` and leaves computing it to the user (usually with
``measure_flops`` on a hand-made batch). Here the first training batch runs under a FLOP counter
(``zoo.flops``): forward, backward and whatever else the step executes, at the shapes the data really has, so
the figure is the model's and not an estimate; validation batches are counted the same way (forward only).
The peak to divide by comes from ``zoo.flops.peak_flops`` (GPU tables, or a measured CPU matmul rate), so MFU is
reported on every device. A module with ``batch_tokens(batch) -> int`` (sequence models) also gets tokens/s.

Logged every ``log_every_n_steps`` as ``train/device/mfu``, ``train/device/flops_per_sec``,
``train/samples_per_sec``, ``train/items_per_sec`` (tokens) and so on, once ``window_size`` batches were seen.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ThroughputMonitor as LightningThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from torch import Tensor
from torch.utils._pytree import tree_leaves

from zoo.flops import flop_counter, peak_flops

__all__ = ["ThroughputMonitor"]


def batch_size(batch: Any) -> int:
    """The first dimension of the batch's first tensor (images, tokens...): its sample count."""
    return next((leaf.shape[0] for leaf in tree_leaves(batch) if isinstance(leaf, Tensor) and leaf.ndim), 1)


class ThroughputMonitor(LightningThroughputMonitor):
    """Args:
    window_size: batches averaged over (Lightning's ``Throughput``); nothing is logged before that many.
    available_flops: the device's peak FLOP/s, when the table or the CPU measurement is not what you want.
    """

    def __init__(self, window_size: int = 20, available_flops: float | None = None) -> None:
        super().__init__(batch_size_fn=batch_size, window_size=window_size)
        self.peak_override = available_flops
        self.flops: dict[RunningStage, int] = {}
        self._counter = None
        self._counting: RunningStage | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        from lightning.fabric.utilities.throughput import Throughput
        from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype

        dtype = _plugin_to_compute_dtype(trainer.precision_plugin)
        self.available_flops = self.peak_override or peak_flops(trainer.strategy.root_device, dtype)
        if hasattr(pl_module, "batch_tokens"):
            self.length_fn = pl_module.batch_tokens
        stages = [trainer.state.stage]
        if stage == TrainerFn.FITTING and trainer.enable_validation:
            stages.append(RunningStage.VALIDATING)
        for running in stages:
            self._throughputs[running] = Throughput(
                available_flops=self.available_flops, world_size=trainer.world_size, **self.kwargs
            )

    def state_dict(self) -> dict[str, Any]:
        """The counts travel in checkpoints: a resumed fit does not count again, so it runs every step as the
        uninterrupted fit did (a step under the counter may round differently)."""
        return {"flops": {stage.value: flops for stage, flops in self.flops.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.flops = {RunningStage(stage): flops for stage, flops in state_dict.get("flops", {}).items()}

    # ------------------------------------------------------------------ counting
    def _start_count(self, trainer: Trainer) -> None:
        stage = trainer.state.stage
        if trainer.is_global_zero and stage not in self.flops and self._counter is None:
            self._counter, self._counting = flop_counter(), stage
            self._counter.__enter__()

    def _end_count(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._counter is not None and trainer.state.stage == self._counting:
            self._counter.__exit__(None, None, None)
            self.flops[self._counting] = self._counter.get_total_flops()
            self._counter = self._counting = None
        # None where nothing was counted (e.g. elementwise work only): no FLOP figures rather than zeros
        pl_module.flops_per_batch = self.flops.get(trainer.state.stage) or None
        self._module_has_flops = True

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._counter = self._counting = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._start_count(trainer)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._end_count(trainer, pl_module)
        super().on_train_batch_end(trainer, pl_module, *args)

    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs
    ) -> None:
        if not trainer.sanity_checking:
            self._start_count(trainer)

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs
    ) -> None:
        if not trainer.sanity_checking:
            self._end_count(trainer, pl_module)
        super().on_validation_batch_end(trainer, pl_module, *args, **kwargs)
