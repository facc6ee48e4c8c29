"""What a ``zoo fit`` shows while it runs and says when it ends.

``ZooProgressBar`` is Lightning's tqdm bar with room for what matters in an 80-column terminal: the training
loss and the metric the checkpoint callback monitors, with four significant digits, and no ``v_num`` (the run
folder is printed at the end). ``fit_summary`` is the one line a fit ends with.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import TQDMProgressBar

__all__ = ["ZooProgressBar", "fit_summary"]


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
