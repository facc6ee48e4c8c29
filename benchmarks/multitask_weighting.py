"""Which task weighting does best on the embedded arithmetic tasks, at an equal number of steps?

Each ``configs/multitask/arithmetic*.yaml`` (static, uncertainty, DWA, GradNorm, loss trend:
the same model, data and seed, only the weighting differs) is trained by ``zoo fit`` for the
same ``--steps`` (the LR schedule fitted to them), then validated; the table lists every
task's final validation metric, the weights each method ended with, and the wall time.

    python benchmarks/multitask_weighting.py                  # 600 steps each, CPU
    python benchmarks/multitask_weighting.py --steps 1500 --methods static gradnorm

Prints a table and writes ``benchmarks/results/multitask_weighting.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from zoo.cli import ZooCLI

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "multitask_weighting.json"
CONFIGS = {
    "static": "arithmetic.yaml",
    "uncertainty": "arithmetic_uncertainty.yaml",
    "dwa": "arithmetic_dwa.yaml",
    "gradnorm": "arithmetic_gradnorm.yaml",
    "loss_trend": "arithmetic_loss_trend.yaml",
}
METRICS = ("val/wellformed/acc", "val/roles/token_acc", "val/value/exact_match", "val/value/token_acc")


def run(method: str, steps: int, epoch_steps: int, root: Path) -> dict:
    config = ROOT / "configs" / "multitask" / CONFIGS[method]
    # an "epoch" of epoch_steps steps, so DWA and the trend rule see several epochs in a short run
    start = time.perf_counter()
    cli = ZooCLI(
        args=[
            "fit",
            "--config",
            str(config),
            f"--trainer.max_steps={steps}",
            "--trainer.max_epochs=-1",
            f"--trainer.limit_train_batches={epoch_steps}",
            f"--trainer.check_val_every_n_epoch={max(1, steps // epoch_steps)}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.callbacks=[]",
            f"--trainer.default_root_dir={root}",
        ]
    )
    seconds = time.perf_counter() - start
    metrics = cli.trainer.validate(cli.model, cli.datamodule, verbose=False)[0]
    return {
        "method": method,
        "steps": cli.trainer.global_step,
        "seconds": round(seconds, 1),
        **{k: round(float(metrics[k]), 4) for k in METRICS},
        "final_weights": {k: round(v, 3) for k, v in cli.model.weighting.weights().items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--epoch-steps", type=int, default=50)
    parser.add_argument("--methods", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny model: 1 is fastest)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for method in args.methods:
            rows.append(run(method, args.steps, args.epoch_steps, Path(root)))
            print(rows[-1], flush=True)
    print(f"\nweighting methods at {args.steps} steps (validation, 500 held-out expressions per task)")
    print(
        f"{'method':<12} {'wellformed acc':>15} {'roles token acc':>16} {'value exact':>12} {'value tok acc':>14} {'time s':>7}"
    )
    for r in rows:
        print(
            f"{r['method']:<12} {r[METRICS[0]]:>15.3f} {r[METRICS[1]]:>16.3f} {r[METRICS[2]]:>12.3f} "
            f"{r[METRICS[3]]:>14.3f} {r['seconds']:>7.0f}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": platform.platform(),
        "torch": torch.__version__,
        "threads": args.threads,
        "args": vars(args),
    }
    RESULTS.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
