"""How much does EMA cost per training step? ``zoo.callbacks.EMA`` vs Lightning's ``EMAWeightAveraging``.

A ViT-tiny (timm ``vit_tiny_patch16_224`` at the given image and patch size) trains on random images with
*both* callbacks attached to the same run, each updating after every optimizer step with the same decay.
Each callback's hooks are timed where Lightning calls them, so the two are measured side by side on the
very same steps: drift on a shared machine cannot favour either. The step time without EMA is the step
time less both callbacks' time. The update is also timed in isolation on the same model, and the two
averages are compared at the end (they must be equal: same decay, both copy at their first update).

    python benchmarks/ema_overhead.py                # CPU defaults, a few minutes on 2 shared cores
    python benchmarks/ema_overhead.py --accelerator gpu --img-size 224 --patch-size 16 --batch-size 128

Prints a table and writes ``benchmarks/results/ema_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging
from torch.utils.data import DataLoader, Dataset

from zoo.callbacks import EMA
from zoo.vision import ImageClassifier

RESULTS = Path(__file__).resolve().parent / "results" / "ema_overhead.json"


class RandomImages(Dataset):
    def __init__(self, n: int, size: int, num_classes: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, size, size, generator=generator)
        self.labels = torch.randint(0, num_classes, (n,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": self.labels[i], "caption": ""}


class StepTimer(Callback):
    """Time between consecutive ``on_train_batch_start`` calls: everything a step costs, callbacks included."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        self.starts.append(time.perf_counter())

    def step_times(self, warmup: int) -> list[float]:
        return [b - a for a, b in zip(self.starts[warmup:], self.starts[warmup + 1 :])]


def make_model(args) -> ImageClassifier:
    L.seed_everything(0, verbose=False)
    return ImageClassifier(
        model_name="vit_tiny_patch16_224",
        num_classes=10,
        img_size=args.img_size,
        patch_size=args.patch_size,
        lr_scheduler=None,
    )


def timed(callback: Callback, hooks=("on_train_batch_end",)) -> list[float]:
    """Wrap the callback's per-step hooks so every call's duration is recorded (per optimizer step)."""
    times: list[float] = []
    for name in hooks:
        hook = getattr(callback, name)

        def wrapper(*args, _hook=hook, **kwargs):
            start = time.perf_counter()
            _hook(*args, **kwargs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)

        setattr(callback, name, wrapper)
    return times


def run_fit(args) -> dict:
    """One training run with both EMAs attached; per-step times of the step and of each callback."""
    model = make_model(args)
    timer = StepTimer()
    ours, lightning = EMA(decay=args.decay, evaluate_with_ema=False), EMAWeightAveraging(decay=args.decay)
    ours_times, lightning_times = timed(ours), timed(lightning)
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        max_steps=args.warmup + args.steps + 1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer, ours, lightning],
    )
    n = args.batch_size * (args.warmup + args.steps + 1)
    loader = DataLoader(RandomImages(n, args.img_size, 10), batch_size=args.batch_size, drop_last=True)
    trainer.fit(model, loader)
    steps = timer.step_times(args.warmup)
    k = len(steps)
    # Lightning copies the average into the model at train end; compare the averages themselves.
    theirs = dict(lightning._average_model.module.named_parameters())
    diff = max(float((e - theirs[n]).abs().max()) for n, e in zip(ours.names, ours.ema) if n in theirs)
    return {
        "step": steps,
        "ours": ours_times[args.warmup : args.warmup + k],
        "lightning": lightning_times[args.warmup : args.warmup + k],
        "max_abs_diff": diff,
    }


def time_updates(args, repeats: int = 30) -> dict[str, float]:
    """Seconds per EMA update in isolation on the benchmark's model, ours and Lightning's alternating."""
    from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn

    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    model = make_model(args).to(device)
    ema = EMA(decay=args.decay)
    ema._initialize(model)
    ema.update(model, 0.0)
    # What EMAWeightAveraging calls on each update (an AveragedModel with a per-tensor avg_fn).
    averaged = AveragedModel(model, device=device, use_buffers=True, avg_fn=get_ema_avg_fn(args.decay))
    averaged.update_parameters(model)
    updates = {
        "ours": lambda: ema.update(model, args.decay),
        "lightning": lambda: averaged.update_parameters(model),
    }
    times: dict[str, list[float]] = {k: [] for k in updates}
    for i in range(repeats + 3):
        for kind, update in updates.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            update()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 3:
                times[kind].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps")
    parser.add_argument("--decay", type=float, default=0.999)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    run = run_fit(args)
    hooks = {k: statistics.median(run[k]) for k in ("ours", "lightning")}
    # The step without EMA: each step's time less both callbacks' time in that step.
    none = statistics.median(s - a - b for s, a, b in zip(run["step"], run["ours"], run["lightning"]))
    update = time_updates(args)
    overhead = {k: 100 * hooks[k] / none for k in hooks}
    isolated = {k: 100 * update[k] / none for k in update}
    params = sum(p.numel() for p in make_model(args).parameters())
    result = {
        "config": {**{k: str(v) for k, v in vars(args).items()}, "parameters": params},
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "step_time_s_no_ema": none,
        "callback_time_s_per_step": hooks,
        "overhead_pct_of_step": overhead,
        "ours_over_lightning_overhead": hooks["ours"] / hooks["lightning"],
        "update_time_s_isolated": update,
        "overhead_pct_of_step_isolated": isolated,
        "ours_over_lightning_isolated": update["ours"] / update["lightning"],
        "max_abs_diff_ours_vs_lightning_average": run["max_abs_diff"],
        "raw": run,
    }
    print(
        f"\nViT-tiny ({params / 1e6:.2f}M params), {args.img_size}px / patch {args.patch_size}, "
        f"batch {args.batch_size}, {args.accelerator}, {args.precision}; step without EMA {1e3 * none:.1f} ms"
    )
    print(f"{'':<22}{'in-run (ms)':>12}{'overhead':>10}{'isolated (ms)':>15}{'overhead':>10}")
    for kind, label in (("ours", "zoo.callbacks.EMA"), ("lightning", "EMAWeightAveraging")):
        print(
            f"{label:<22}{1e3 * hooks[kind]:>12.2f}{overhead[kind]:>9.2f}%"
            f"{1e3 * update[kind]:>15.2f}{isolated[kind]:>9.2f}%"
        )
    print(
        f"ours / Lightning: {result['ours_over_lightning_overhead']:.3f} in the run, "
        f"{result['ours_over_lightning_isolated']:.3f} isolated; "
        f"max |ours - Lightning| averaged weight: {run['max_abs_diff']:.2e}"
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"written: {args.output}")


if __name__ == "__main__":
    main()
