"""How much does ``zoo.callbacks.TrainingMonitor`` cost per training step, at its default settings?

A ViT-tiny (timm ``vit_tiny_patch16_224`` at the given image and patch size) trains on random images with the
monitor attached (defaults: statistics every 50 steps, per-layer norms and weight statistics, loss-spike and
gradient checks every step) and a CSV logger, so the logged values go where a user's would. Every monitor hook
is timed where Lightning calls it, so "with" and "without" are measured side by side on the very same steps
(drift on a shared machine cannot favour either): the step time without the monitor is each step's time less
the monitor's time in it. The overhead is reported amortised (total monitor time / total step time without it,
over a whole number of logging periods) and split into ordinary steps and logging steps. The first steps (the
data check of the first batches runs there, once per fit) are left out as warm-up.

    python benchmarks/monitor_overhead.py                # CPU defaults, a few minutes on 2 shared cores
    python benchmarks/monitor_overhead.py --accelerator gpu --img-size 224 --patch-size 16 --batch-size 128

Prints a table and writes ``benchmarks/results/monitor_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from ema_overhead import RandomImages, StepTimer, make_model  # the sibling benchmark's model and timer
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from zoo.callbacks import TrainingMonitor

RESULTS = Path(__file__).resolve().parent / "results" / "monitor_overhead.json"
HOOKS = ("on_train_batch_start", "on_before_backward", "on_before_optimizer_step", "on_train_batch_end")


def timed_hooks(callback: TrainingMonitor) -> list[list[float]]:
    """Wrap the monitor's per-step hooks; returns, per step (batch start), the list of hook durations."""
    steps: list[list[float]] = []
    for name in HOOKS:
        hook = getattr(callback, name)

        def wrapper(*args, _hook=hook, _name=name, **kwargs):
            if _name == "on_train_batch_start":
                steps.append([])
            start = time.perf_counter()
            _hook(*args, **kwargs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            steps[-1].append(time.perf_counter() - start)

        setattr(callback, name, wrapper)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--periods", type=int, default=2, help="timed logging periods (of 50 steps)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps (includes the data check)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.decay = 0.0  # make_model (shared with ema_overhead) reads only sizes

    monitor = TrainingMonitor()  # default settings
    period = monitor.log_every_n_steps
    # Start the timed window right after a logging step, so it holds exactly `periods` logging steps.
    first = args.warmup + (-args.warmup) % period
    total = first + args.periods * period + 1
    hook_times = timed_hooks(monitor)
    timer = StepTimer()
    model = make_model(args)
    with tempfile.TemporaryDirectory() as log_dir:
        trainer = L.Trainer(
            accelerator=args.accelerator,
            devices=1,
            precision=args.precision,
            max_steps=total,
            limit_val_batches=0,
            logger=CSVLogger(log_dir),
            log_every_n_steps=period,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[timer, monitor],
        )
        loader = DataLoader(
            RandomImages(args.batch_size * total, args.img_size, 10), batch_size=args.batch_size
        )
        trainer.fit(model, loader)
    steps = timer.step_times(first)  # step i spans batch start i .. batch start i + 1
    monitor_per_step = [sum(t) for t in hook_times[first : first + len(steps)]]
    without = [s - m for s, m in zip(steps, monitor_per_step)]
    logging = [(i + first + 1) % period == 0 for i in range(len(steps))]  # global_step + 1 hits the period
    ordinary = [m for m, log in zip(monitor_per_step, logging) if not log]
    log_steps = [m for m, log in zip(monitor_per_step, logging) if log]
    step_none = statistics.median(without)
    amortised = 100 * sum(monitor_per_step) / sum(without)
    params = sum(p.numel() for p in model.parameters())
    result = {
        "config": {**{k: str(v) for k, v in vars(args).items() if k != "decay"}, "parameters": params},
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "timed_steps": len(steps),
        "step_time_s_no_monitor_median": step_none,
        "monitor_time_s_ordinary_step_median": statistics.median(ordinary),
        "monitor_time_s_logging_step_mean": statistics.mean(log_steps) if log_steps else None,
        "overhead_pct_ordinary_step": 100 * statistics.median(ordinary) / step_none,
        "overhead_pct_logging_step": 100 * statistics.mean(log_steps) / step_none if log_steps else None,
        "overhead_pct_amortised": amortised,
        "raw": {"step": steps, "monitor": monitor_per_step},
    }
    print(
        f"\nViT-tiny ({params / 1e6:.2f}M params), {args.img_size}px / patch {args.patch_size}, batch "
        f"{args.batch_size}, {args.accelerator}, {args.precision}; {len(steps)} timed steps "
        f"({len(log_steps)} logging steps, every {period})"
    )
    print(f"{'':<34}{'time (ms)':>10}{'% of step':>11}")
    print(f"{'step without monitor (median)':<34}{1e3 * step_none:>10.1f}{100:>10.1f}%")
    print(
        f"{'monitor, ordinary step (median)':<34}{1e3 * statistics.median(ordinary):>10.2f}"
        f"{result['overhead_pct_ordinary_step']:>10.2f}%"
    )
    if log_steps:
        print(
            f"{'monitor, logging step (mean)':<34}{1e3 * statistics.mean(log_steps):>10.2f}"
            f"{result['overhead_pct_logging_step']:>10.2f}%"
        )
    print(f"{'monitor, amortised':<34}{'':>10}{amortised:>10.2f}%   (target <= 2%)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"written: {args.output}")


if __name__ == "__main__":
    main()
