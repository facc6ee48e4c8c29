"""Data-parallel scaling of the ViT classifier: samples/s and peak memory per process, 1 vs 2 processes.

Each configuration is a real ``Trainer.fit`` of ``zoo.vision.ImageClassifier`` (timm ViT, random images) run
in its own subprocess, so every process's peak resident memory (``ru_maxrss``) belongs to that configuration
alone. The per-process batch is fixed (weak scaling): 2 processes handle twice the global batch per step, so
perfect scaling doubles samples/s. Every process gets ``--threads`` intra-op threads, so 2 processes use twice
the cores of 1; on a machine with fewer free cores than that, the 2-process figures measure contention, not
the strategy. Steps after ``--warmup`` are timed between ``on_train_batch_start`` calls (forward, backward,
gradient all-reduce / reduce-scatter, optimizer step, callbacks).

Strategies: ``single`` (one process), ``ddp`` (``DDPStrategy``, gloo on CPU, NCCL on GPU) and ``fsdp2``
(``ModelParallelStrategy``; ``ZooModule.configure_model`` shards every transformer block, then the root).
Parameters+gradients+optimizer state per rank shrink with FSDP2; activations do not, and on a small ViT the
framework's own memory dominates RSS.

    python benchmarks/distributed_scaling.py                       # CPU: single, ddp, fsdp2
    python benchmarks/distributed_scaling.py --strategies single ddp --steps 30

GPU options (``--accelerator gpu``; ``--devices`` is then the GPU count of the parallel runs):

- ``fsdp``: ``zoo.strategies.ShardingUnitsFSDP`` (FSDP1, full shard, auto-wrap by ``sharding_units``);
- ``deepspeed2`` / ``deepspeed3``: ``zoo.strategies.ShardingUnitsDeepSpeed`` ZeRO stage 2 / 3 (no offload, so
  the figures are the GPU's; ``configs/strategy/deepspeed_zero*.yaml`` add CPU offload);
- ``--activation-checkpointing``: recompute each transformer block in backward (FSDP, DeepSpeed and FSDP2
  through ``zoo.strategies.apply_activation_checkpointing``), trading step time for activation memory;
- peak memory on GPU is ``torch.cuda.max_memory_allocated`` per rank, reported next to RSS.

    python benchmarks/distributed_scaling.py --accelerator gpu --devices 8 --img-size 224 --patch-size 16 \\
        --depth 12 --embed-dim 384 --batch-size 64 --strategies single ddp fsdp2 fsdp deepspeed2 deepspeed3
    python benchmarks/distributed_scaling.py --accelerator gpu --devices 8 ... --activation-checkpointing

Prints a table and writes ``benchmarks/results/distributed_scaling.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "distributed_scaling.json"
PARALLEL = ("ddp", "fsdp2", "fsdp", "deepspeed2", "deepspeed3")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--strategies", nargs="+", default=["single", "ddp", "fsdp2"])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=2, help="processes of the parallel runs")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16, help="per process")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--embed-dim", type=int, default=384)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--worker", help=argparse.SUPPRESS
    )  # internal: run one configuration, write JSON here
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------- one configuration
def make_strategy(name: str, args: argparse.Namespace):
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    from zoo.strategies import ShardingUnitsDeepSpeed, ShardingUnitsFSDP

    backend = "nccl" if args.accelerator == "gpu" else "gloo"
    checkpointing = args.activation_checkpointing
    if name == "single":
        return "auto"
    if name == "ddp":
        return DDPStrategy(process_group_backend=backend)
    if name == "fsdp2":
        return ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
    if name == "fsdp":
        return ShardingUnitsFSDP(auto_wrap=True, activation_checkpointing=checkpointing)
    if name in ("deepspeed2", "deepspeed3"):
        return ShardingUnitsDeepSpeed(stage=int(name[-1]), activation_checkpointing=checkpointing)
    raise ValueError(f"unknown strategy {name!r}; choose from single, {', '.join(PARALLEL)}")


def worker(args: argparse.Namespace) -> None:
    """Runs inside the (re-launched) processes of one configuration; every rank writes its own figures."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader, TensorDataset

    from zoo.strategies import apply_activation_checkpointing
    from zoo.vision import ImageClassifier

    torch.set_num_threads(args.threads)
    name = args.strategies[0]
    processes = 1 if name == "single" else args.devices

    class Images(TensorDataset):
        def __getitem__(self, i: int) -> dict:
            image, label = super().__getitem__(i)
            return {"image": image, "label": label}

    class Timer(Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.strategy.root_device.type == "cuda":
                torch.cuda.synchronize()
            self.starts.append(time.perf_counter())

    class Checkpointed(ImageClassifier):
        def configure_model(self) -> None:  # recompute blocks before FSDP2 shards them
            if args.activation_checkpointing and name in ("single", "ddp", "fsdp2"):
                apply_activation_checkpointing(self, self.sharding_units)
            super().configure_model()

    L.seed_everything(0, verbose=False)
    model = Checkpointed(
        "vit_tiny_patch16_224",
        num_classes=10,
        img_size=args.img_size,
        patch_size=args.patch_size,
        model_kwargs={"depth": args.depth, "embed_dim": args.embed_dim, "num_heads": 3},
    )
    total = args.batch_size * processes * (args.steps + 1)
    generator = torch.Generator().manual_seed(0)
    data = Images(
        torch.randn(total, 3, args.img_size, args.img_size, generator=generator),
        torch.randint(0, 10, (total,), generator=generator),
    )
    timer = Timer()
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=processes,
        strategy=make_strategy(name, args),
        max_steps=args.steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(model, DataLoader(data, batch_size=args.batch_size, shuffle=True))
    timer.starts.append(time.perf_counter())  # end of the last step (the loop ends right after it)
    steps = [b - a for a, b in zip(timer.starts, timer.starts[1:])][args.warmup :]
    figures = {
        "rank": trainer.global_rank,
        "median_step_s": statistics.median(steps),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "parameters_on_rank": sum(
            (p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters()
        ),
    }
    if torch.cuda.is_available() and args.accelerator == "gpu":
        figures["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    Path(f"{args.worker}.rank{trainer.global_rank}.json").write_text(json.dumps(figures))


# --------------------------------------------------------------------------------------------- the driver
def run_configuration(name: str, args: argparse.Namespace, directory: Path) -> dict:
    out = directory / name
    command = [sys.executable, __file__, "--worker", str(out), "--strategies", name]
    for flag in ("accelerator", "devices", "steps", "warmup", "batch_size", "img_size", "patch_size"):
        command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    for flag in ("depth", "embed_dim", "threads"):
        command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.activation_checkpointing:
        command.append("--activation-checkpointing")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1])
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    ranks = [json.loads(p.read_text()) for p in sorted(directory.glob(f"{name}.rank*.json"))]
    processes = len(ranks)
    step = max(r["median_step_s"] for r in ranks)  # ranks wait for each other: the slowest sets the pace
    return {
        "strategy": name,
        "processes": processes,
        "global_batch": args.batch_size * processes,
        "median_step_s": step,
        "samples_per_s": args.batch_size * processes / step,
        "peak_rss_mib_per_process": [round(r["peak_rss_mib"], 1) for r in ranks],
        "parameters_per_process": [r["parameters_on_rank"] for r in ranks],
        **(
            {"peak_gpu_mib_per_process": [round(r["peak_gpu_mib"], 1) for r in ranks]}
            if "peak_gpu_mib" in ranks[0]
            else {}
        ),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.worker:
        return worker(args)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for name in args.strategies:
            rows.append(run_configuration(name, args, Path(directory)))
            print(f"done: {name}", flush=True)
    base = next((r["samples_per_s"] for r in rows if r["strategy"] == "single"), None)
    print(
        f"\n{'strategy':<12}{'procs':>6}{'batch':>7}{'step s':>9}{'samples/s':>11}{'x single':>10}  RSS MiB/proc"
    )
    for r in rows:
        ratio = f"{r['samples_per_s'] / base:.2f}" if base else "-"
        rss = ", ".join(f"{m:.0f}" for m in r["peak_rss_mib_per_process"])
        print(
            f"{r['strategy']:<12}{r['processes']:>6}{r['global_batch']:>7}{r['median_step_s']:>9.3f}"
            f"{r['samples_per_s']:>11.1f}{ratio:>10}  {rss}"
        )
    result = {
        "benchmark": "distributed_scaling",
        "command": "python benchmarks/distributed_scaling.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
        },
        "settings": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"
        },
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
