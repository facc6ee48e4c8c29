"""What a ``zoo fit`` shows while it runs and says when it ends.

``ZooModelSummary`` is Lightning's model summary with the forward FLOPs of ``example_inputs()`` counted (Lightning's
needs ``example_input_array``, whose forward fails inside its per-layer FLOP tracker for modules fed parameters,
e.g. prompts or queries). ``ZooProgressBar`` is Lightning's tqdm bar with room for what matters in an 80-column terminal: the training
loss and the metric the checkpoint callback monitors, with four significant digits, and no ``v_num`` (the run
folder is printed at the end). ``fit_summary`` is the one line a fit ends with.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelSummary, TQDMProgressBar
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

__all__ = ["ZooModelSummary", "ZooProgressBar", "fit_summary"]


class ZooModelSummary(ModelSummary):
    """Lightning's summary table, its "Total FLOPs" the forward of ``example_inputs()`` (batch 2) on one process."""

    def on_fit_start(self, trainer, pl_module) -> None:
        if not self._max_depth:
            return
        summary = self._summary(trainer, pl_module)
        if trainer.is_global_zero:
            self.summarize(
                summary._get_summary_data(),
                summary.total_parameters,
                summary.trainable_parameters,
                summary.model_size,
                summary.total_training_modes,
                total_flops=example_forward_flops(trainer, pl_module),
                **self._summarize_kwargs,
            )


def example_forward_flops(trainer, pl_module) -> int:
    """FLOPs of ``forward(*example_inputs())``; 0 where it cannot run alone (sharded, meta, no example).

    The random streams are left as they were: example inputs are drawn on one rank only, and the fit that
    follows must draw what it would have drawn without the summary."""
    from zoo.flops import count_flops

    sharded = not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy))
    if sharded or not hasattr(pl_module, "example_inputs") or any(p.is_meta for p in pl_module.parameters()):
        return 0
    training = pl_module.training
    try:
        pl_module.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            inputs = pl_module.example_inputs()
            return count_flops(lambda: pl_module(*inputs))
    except NotImplementedError:
        return 0
    finally:
        pl_module.train(training)


class ZooProgressBar(TQDMProgressBar):
    """The loss and the monitored metric only, so the bar never wraps an 80-column line."""

    def get_metrics(self, trainer, pl_module) -> dict[str, int | str | float | dict[str, float]]:
        items = super().get_metrics(trainer, pl_module)
        checkpoint = trainer.checkpoint_callback
        wanted = ("train/loss", getattr(checkpoint, "monitor", None) or "val/loss")
        return {_short(k): _format(v) for k, v in items.items() if k in wanted}


def _short(name: str) -> str:
    return "loss" if name == "train/loss" else name


def _format(value):
    return f"{value:.4g}" if isinstance(value, float) else value


def fit_summary(trainer, seconds: float) -> str:
    """``zoo: fit done in 4 min 13 s; best val/acc 0.957 at <path>; logs in <folder>``."""
    minutes, rest = divmod(round(seconds), 60)
    parts = [f"zoo: fit done in {minutes} min {rest} s" if minutes else f"zoo: fit done in {rest} s"]
    checkpoint = trainer.checkpoint_callback
    best_path = getattr(checkpoint, "best_model_path", "") or getattr(checkpoint, "last_model_path", "")
    best_path = best_path if best_path and Path(best_path).exists() else ""  # fast_dev_run saves nothing
    score = getattr(checkpoint, "best_model_score", None)
    if best_path and score is not None and checkpoint.monitor:
        parts.append(f"best {checkpoint.monitor} {float(score):.4g} at {best_path}")
    elif best_path:
        parts.append(f"checkpoint {best_path}")
    if trainer.log_dir:
        parts.append(f"logs in {Path(trainer.log_dir)}")
    return "; ".join(parts)
