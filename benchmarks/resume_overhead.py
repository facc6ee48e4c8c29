"""What exact resume costs each family's default config: the time of one ``last.ckpt`` save against the training
steps between two saves at the default interval (``--resume.every_n_train_steps``, 200).

Each default config trains ``--steps`` steps through the zoo's CLI with ``last.ckpt`` written every ``--every``
steps (more often than the default, to time several saves in one short run). Step times come from the training
loop's batch hooks with the saves taken out; save times are measured around ``ResumeCheckpoint``'s write (the
whole checkpoint: weights, optimizer, schedulers, callback and loader states, through the atomic, fsynced
writer). The share is ``save / (interval x step)``; a kill loses at most ``interval`` steps.

    OMP_NUM_THREADS=2 python benchmarks/resume_overhead.py            # about 3 minutes on 2 cores, alone

Prints a table and writes ``benchmarks/results/resume_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from zoo.cli import ZooCLI
from zoo.resume import ResumeCheckpoint, ResumeState

RESULTS = Path(__file__).resolve().parent / "results" / "resume_overhead.json"
DEFAULT_INTERVAL = 200
FAMILIES = {  # the default config of each family, with data sizes that leave room for --steps
    "vision (deit_tiny)": ["--config", "deit_tiny", "--data.init_args.train_size=2048"],
    "protein (esm2_t6_8M)": ["--config", "esm2_t6_8M"],
    "multitask (arithmetic)": ["--config", "configs/multitask/arithmetic.yaml"],
    "bev (bevformer_cpu)": ["--config", "configs/bev/bevformer_cpu.yaml"],
    "diffusion (autoencoder_kl_f4)": ["--config", "configs/diffusion/autoencoder_kl_f4.yaml"],
}


class StepTimes(Callback):
    def __init__(self) -> None:
        self.steps: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, *args) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.steps.append(time.perf_counter() - self._start)


def timed_saves(callback: ResumeCheckpoint) -> list[float]:
    times: list[float] = []
    save = callback._save_checkpoint

    def timed(trainer, filepath):
        start = time.perf_counter()
        save(trainer, filepath)
        times.append(time.perf_counter() - start)

    callback._save_checkpoint = timed
    return times


def measure(arguments: list[str], steps: int, every: int, root: str) -> dict:
    cli = ZooCLI(
        args=[
            *arguments,
            f"--trainer.max_steps={steps}",
            "--trainer.limit_val_batches=0",
            f"--trainer.default_root_dir={root}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
        ],
        run=False,
    )
    # what `zoo fit` adds to every run (built without a subcommand here, to be timed in this process)
    resume, timer = ResumeCheckpoint(every_n_train_steps=every), StepTimes()
    cli.trainer.callbacks[:0] = [timer]
    cli.trainer.callbacks += [ResumeState(), resume]
    saves = timed_saves(resume)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    # this timer runs first among the batch-end hooks and the save last, so step times hold no save
    step = statistics.median(timer.steps[2:])  # the first steps warm up
    save = statistics.median(saves[:-1] or saves)  # the last one is the end-of-training save
    path = Path(resume.last_model_path)
    size = sum(f.stat().st_size for f in path.rglob("*")) if path.is_dir() else path.stat().st_size
    return {
        "step_s": step,
        "save_s": save,
        "checkpoint_mb": size / 2**20,
        "saves_timed": len(saves),
        "share_at_default_interval": save / (DEFAULT_INTERVAL * step),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--every", type=int, default=6)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as root:
        for name, arguments in FAMILIES.items():
            results[name] = measure(arguments, args.steps, args.every, f"{root}/{len(results)}")
    print(
        f"\nlast.ckpt every {DEFAULT_INTERVAL} steps (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})"
    )
    print(f"{'family':32} {'step ms':>8} {'save ms':>8} {'MiB':>7} {'share':>7}")
    for name, r in results.items():
        print(
            f"{name:32} {r['step_s'] * 1e3:8.1f} {r['save_s'] * 1e3:8.1f} {r['checkpoint_mb']:7.1f} "
            f"{r['share_at_default_interval']:7.2%}"
        )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "interval": DEFAULT_INTERVAL,
                "machine": platform.processor() or platform.machine(),
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
