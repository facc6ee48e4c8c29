"""How much does ``zoo.callbacks.TrainingMonitor`` cost per training step, at its default settings?

A ViT-tiny (timm ``vit_tiny_patch16_224`` at the given image and patch size) trains on random images with the
monitor attached (defaults: statistics every 50 steps, per-layer norms and weight statistics, loss-spike and
gradient checks every step) and a CSV logger, so the logged values go where a user's would. Every monitor hook
is timed where Lightning calls it, so "with" and "without" are measured side by side on the very same steps
(drift on a shared machine cannot favour either): the step time without the monitor is each step's time less
the monitor's time in it. The overhead is reported amortised (total monitor time / total step time without it,
over a whole number of logging periods) and split into ordinary steps and logging steps. The first steps (the
data check of the first batches runs there, once per fit) are left out as warm-up. On the CPU the same split is
also taken in CPU time of the process (``time.process_time``, meant for ``OMP_NUM_THREADS=1``): time spent
descheduled on a shared machine is in neither the step nor the monitor. Contention for memory bandwidth and
caches is in both, and it weighs more on the monitor (its per-step work is one read of every gradient, bound by
memory) than on the step (bound by compute): on a loaded machine both figures rise, so compare within a run or
run several rounds.

    OMP_NUM_THREADS=1 python benchmarks/monitor_overhead.py --rounds 5   # CPU defaults, 1.5-3 min a round
    python benchmarks/monitor_overhead.py --accelerator gpu --img-size 224 --patch-size 16 --batch-size 128

Prints a table per round (each a fresh fit; with ``--rounds`` the median and range of the amortised overhead)
and writes ``benchmarks/results/monitor_overhead.json``.
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


class Clocks(StepTimer):
    """``StepTimer`` (wall clock at each batch start), plus the process's CPU time at the same moments."""

    def __init__(self) -> None:
        super().__init__()
        self.cpu_starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self.cpu_starts.append(time.process_time())

    def cpu_step_times(self, warmup: int) -> list[float]:
        return [b - a for a, b in zip(self.cpu_starts[warmup:], self.cpu_starts[warmup + 1 :])]


def timed_hooks(callback: TrainingMonitor) -> tuple[list[list[float]], list[list[float]]]:
    """Wrap the monitor's per-step hooks; returns, per step (batch start), the lists of hook durations in wall
    clock and in CPU time."""
    steps: list[list[float]] = []
    cpu_steps: list[list[float]] = []
    # asked once: torch.cuda.is_available() takes ~40 us, which the timed window would charge to the monitor
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    for name in HOOKS:
        hook = getattr(callback, name)

        def wrapper(*args, _hook=hook, _name=name, **kwargs):
            if _name == "on_train_batch_start":
                steps.append([])
                cpu_steps.append([])
            start, cpu_start = time.perf_counter(), time.process_time()
            _hook(*args, **kwargs)
            synchronize()
            steps[-1].append(time.perf_counter() - start)
            cpu_steps[-1].append(time.process_time() - cpu_start)

        setattr(callback, name, wrapper)

    return steps, cpu_steps


def split(steps: list[float], monitor: list[float], logging: list[bool]) -> dict[str, float]:
    """The step time without the monitor, the monitor's time on ordinary and logging steps, and the overhead."""
    without = [s - m for s, m in zip(steps, monitor)]
    ordinary = [m for m, log in zip(monitor, logging) if not log]
    log_steps = [m for m, log in zip(monitor, logging) if log]
    step_none = statistics.median(without)
    return {
        "step_time_s_no_monitor_median": step_none,
        "monitor_time_s_ordinary_step_median": statistics.median(ordinary),
        "monitor_time_s_logging_step_mean": statistics.mean(log_steps) if log_steps else None,
        "overhead_pct_ordinary_step": 100 * statistics.median(ordinary) / step_none,
        "overhead_pct_logging_step": 100 * statistics.mean(log_steps) / step_none if log_steps else None,
        "overhead_pct_amortised": 100 * sum(monitor) / sum(without),
    }


def measure(args) -> dict:
    """One fit with the monitor at its defaults; the step and monitor times of its timed window, split."""
    monitor = TrainingMonitor()  # default settings
    period = monitor.log_every_n_steps
    # Start the timed window right after a logging step, so it holds exactly `periods` logging steps.
    first = args.warmup + (-args.warmup) % period
    total = first + args.periods * period + 1
    hook_times, cpu_hook_times = timed_hooks(monitor)
    timer = Clocks()
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
    logging = [(i + first + 1) % period == 0 for i in range(len(steps))]  # global_step + 1 hits the period
    result = {
        "timed_steps": len(steps),
        "logging_steps": sum(logging),
        "period": period,
        "parameters": sum(p.numel() for p in model.parameters()),
        **split(steps, monitor_per_step, logging),
        "raw": {"step": steps, "monitor": monitor_per_step},
    }
    if args.accelerator == "cpu":  # an accelerator's work is not CPU time: no such figure there
        cpu_steps = timer.cpu_step_times(first)
        cpu_monitor = [sum(t) for t in cpu_hook_times[first : first + len(cpu_steps)]]
        result["cpu_time"] = split(cpu_steps, cpu_monitor, logging)
        result["raw"].update(cpu_step=cpu_steps, cpu_monitor=cpu_monitor)
    return result


def columns(result: dict) -> list[tuple[str, dict]]:
    return [("wall clock", result)] + ([("CPU time", result["cpu_time"])] if "cpu_time" in result else [])


def print_table(result: dict) -> None:
    print(f"{'':<34}" + "".join(f"{name:>22}" for name, _ in columns(result)))
    print(f"{'':<34}" + f"{'time (ms)':>11}{'% of step':>11}" * len(columns(result)))
    rows = [
        ("step without monitor (median)", "step_time_s_no_monitor_median", None),
        (
            "monitor, ordinary step (median)",
            "monitor_time_s_ordinary_step_median",
            "overhead_pct_ordinary_step",
        ),
        ("monitor, logging step (mean)", "monitor_time_s_logging_step_mean", "overhead_pct_logging_step"),
    ]
    for label, time_key, pct_key in rows:
        if result[time_key] is None:
            continue
        cells = "".join(
            f"{1e3 * figures[time_key]:>11.2f}"
            + (f"{figures[pct_key]:>10.2f}%" if pct_key else f"{100:>10.1f}%")
            for _, figures in columns(result)
        )
        print(f"{label:<34}{cells}")
    amortised = "".join(
        f"{'':>11}{figures['overhead_pct_amortised']:>10.2f}%" for _, figures in columns(result)
    )
    print(f"{'monitor, amortised':<34}{amortised}   (target <= 2%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--periods", type=int, default=2, help="timed logging periods (of 50 steps)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps (includes the data check)")
    parser.add_argument("--rounds", type=int, default=1, help="fits, each measured alone (median and range)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.decay = 0.0  # make_model (shared with ema_overhead) reads only sizes

    rounds = []
    for i in range(args.rounds):
        result = measure(args)
        rounds.append(result)
        print(
            f"\nround {i + 1}/{args.rounds}: ViT-tiny ({result['parameters'] / 1e6:.2f}M params), {args.img_size}px "
            f"/ patch {args.patch_size}, batch {args.batch_size}, {args.accelerator}, {args.precision}; "
            f"{result['timed_steps']} timed steps ({result['logging_steps']} logging steps, every "
            f"{result['period']})"
        )
        print_table(result)
    summary = {}
    for name, key in (("wall clock", None), ("CPU time", "cpu_time")):
        if key is not None and key not in rounds[0]:
            continue
        figures = [r[key] if key else r for r in rounds]
        summary[key or "wall_clock"] = {
            pct: {"median": statistics.median(v), "min": min(v), "max": max(v)}
            for pct in ("overhead_pct_amortised", "overhead_pct_ordinary_step", "overhead_pct_logging_step")
            if None not in (v := [f[pct] for f in figures])
        }
        if args.rounds > 1:
            amortised = summary[key or "wall_clock"]["overhead_pct_amortised"]
            print(
                f"{name}, amortised over {args.rounds} rounds: median {amortised['median']:.2f}% "
                f"(range {amortised['min']:.2f}-{amortised['max']:.2f}%)"
            )
    result = {
        "config": {k: str(v) for k, v in vars(args).items() if k != "decay"},
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "summary": summary,
        "rounds": rounds,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"written: {args.output}")


if __name__ == "__main__":
    main()
