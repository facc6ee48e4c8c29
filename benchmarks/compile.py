"""What does ``compile: true`` buy per family? Compile time and the training-step speed-up, eager vs compiled.

Each family is built from its config (``configs/<family>/<variant>.yaml``, with the data shrunk so set-up is
quick; models and batch sizes as configured) twice with the same weights: once eager, once with the family's
``compile`` argument (``ZooModule.compile_network``: ``self.model`` compiled in place). Both train on the same
few batches, cycled, with the config's optimizer (no scheduler), outside Lightning so that only the step is
timed (``training_step``, backward, optimizer step; ``self.log`` calls are no-ops without a trainer).

- compile time: the compiled module's first pass over the batches (where Dynamo traces and the backend compiles:
  one graph per shape, train mode, task) less the eager time of the same steps. Inductor's on-disk caches start
  empty (a fresh ``TORCHINDUCTOR_CACHE_DIR``) unless ``--warm-cache``: the first run of a model on a machine.
- speed-up: then eager and compiled steps alternate (ABBA order) on the same batches, so drift on a shared
  machine hits both; the median of ``--steps`` steps each.

    OMP_NUM_THREADS=1 python benchmarks/compile.py                    # every family, inductor, 1 thread
    OMP_NUM_THREADS=1 python benchmarks/compile.py --families vision protein --backend aot_eager

Prints a table and writes ``benchmarks/results/compile.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "compile.json"

#: family -> (config, overrides): the configured model and batch size, a small data set
FAMILIES = {
    "vision": ("vision/vit_tiny.yaml", ["--data.init_args.train_size=512"]),
    "protein": ("protein/esm2_t6_8M.yaml", ["--data.init_args.max_length=126", "--data.init_args.max_tokens=1024"]),
    "multitask": ("multitask/arithmetic.yaml", ["--data.init_args.train_size=512", "--data.init_args.val_size=64"]),
    "bev": ("bev/bevformer_cpu.yaml", ["--data.init_args.train_scenes=2", "--data.init_args.val_scenes=1"]),
    "diffusion": ("diffusion/ldm_unet_class.yaml", ["--data.init_args.train_size=512", "--model.init_args.scale_factor=1.0"]),
}  # fmt: skip


def build(config: str, overrides: list[str]):
    """The config's module and data module (``ZooCLI`` without running)."""
    from zoo.cli import ZooCLI

    args = ["--config", str(ROOT / "configs" / config), *overrides, "--trainer.logger=false"]
    cli = ZooCLI(args=args, run=False)
    return cli.model, cli.datamodule


def compiled_twin(module, config: str, overrides: list[str], options: dict):
    """The same module built again with ``compile`` (``--model.init_args.compile``) and ``module``'s weights."""
    twin, _ = build(config, [*overrides, f"--model.init_args.compile={json.dumps(options)}"])
    twin.load_state_dict(module.state_dict())
    twin.compile_network()  # what configure_model calls under a trainer
    return twin


def batches(datamodule, count: int) -> list:
    datamodule.prepare_data()
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    from lightning.pytorch.utilities import CombinedLoader

    combined = isinstance(loader, CombinedLoader)  # yields (batch, batch_idx, dataloader_idx)
    loader = iter(loader)
    return [next(loader)[0] if combined else next(loader) for _ in range(count)]


class Stepper:
    """One training step of a module at a time: ``training_step``, backward, the config's optimizer."""

    def __init__(self, module, batches: list) -> None:
        self.module = module.train()
        self.batches = copy.deepcopy(batches)  # steps may write into a batch (augmentation)
        self.optimizer = module.optimizer_factory(module.parameter_groups())
        self.times: list[float] = []

    def step(self, i: int) -> float:
        import torch

        start = time.perf_counter()
        loss = self.module.training_step(self.batches[i % len(self.batches)], i)
        loss = loss["loss"] if isinstance(loss, dict) else loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss.detach()):
            raise RuntimeError(f"{type(self.module).__name__}: non-finite loss at step {i}")
        elapsed = time.perf_counter() - start
        self.times.append(elapsed)
        return elapsed


def measure(name: str, args) -> dict:
    import torch
    from torch._dynamo.utils import counters

    config, overrides = FAMILIES[name]
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    module, datamodule = build(config, overrides)
    data = batches(datamodule, args.batches)
    options = {"backend": args.backend, **({"mode": args.mode} if args.mode else {})}
    eager = Stepper(module, data)
    compiled = Stepper(compiled_twin(module, config, overrides, options), data)
    for i in range(len(data)):  # eager warm-up (allocator, first touches): untimed
        eager.step(i)
    first_pass = [compiled.step(i) for i in range(len(data))]  # compiles every graph these batches need
    eager_pass = [eager.step(i) for i in range(len(data))]
    graphs = counters["stats"]["unique_graphs"]
    eager.times.clear()
    compiled.times.clear()
    for i in range(args.steps):
        order = (eager, compiled) if i % 2 == 0 else (compiled, eager)
        for stepper in order:
            stepper.step(i)
    recompiled = counters["stats"]["unique_graphs"] - graphs  # a steady state compiles nothing more
    eager_s, compiled_s = statistics.median(eager.times), statistics.median(compiled.times)
    return {
        "config": config,
        "module": type(module).__name__,
        "network": type(module.model).__name__,
        "parameters": sum(p.numel() for p in module.parameters()),
        "batches": len(data),
        "compile_s": sum(first_pass) - sum(eager_pass),
        "first_step_s": first_pass[0],
        "graphs": graphs,
        "graphs_after_warmup": recompiled,
        "graph_breaks": sum(counters["graph_break"].values()),
        "eager_step_s": eager_s,
        "compiled_step_s": compiled_s,
        "speedup": eager_s / compiled_s,
        "eager_times": eager.times,
        "compiled_times": compiled.times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--mode", default=None, help="torch.compile mode (default: PyTorch's)")
    parser.add_argument("--batches", type=int, default=3, help="distinct batches, cycled")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each module")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warm-cache", action="store_true", help="keep inductor's on-disk caches")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    if not args.warm_cache:  # before torch is imported: the first run of these models on a fresh machine
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="zoo-compile-bench-")
    sys.path.insert(0, str(ROOT))
    warnings.filterwarnings("ignore", message=".*self.log.*")
    warnings.filterwarnings("ignore", message=".*randomly initialised.*")
    import torch

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    results = {}
    for name in args.families:
        print(f"{name}: {FAMILIES[name][0]}", flush=True)
        results[name] = measure(name, args)
        r = results[name]
        print(f"  compile {r['compile_s']:.1f} s, eager {1e3 * r['eager_step_s']:.0f} ms, "
              f"compiled {1e3 * r['compiled_step_s']:.0f} ms: x{r['speedup']:.2f}", flush=True)  # fmt: skip

    result = {
        "command": " ".join(["python", *sys.argv]),
        "config": {k: str(v) for k, v in vars(args).items()},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "load_average_start_end": [load_start, os.getloadavg()[0]],  # other jobs on the machine
        },
        "families": results,
    }
    mode = f", mode={args.mode}" if args.mode else ""
    print(
        f"\ntorch.compile(backend={args.backend}{mode}) of self.model, CPU, {torch.get_num_threads()} thread(s), "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; median of {args.steps} steps each, alternating"
    )
    header = f"{'family':<11}{'module':<20}{'compile (s)':>12}{'graphs':>8}{'eager (ms)':>12}{'compiled (ms)':>15}{'speed-up':>10}"
    print(header)
    for name, r in results.items():
        print(
            f"{name:<11}{r['module']:<20}{r['compile_s']:>12.1f}{r['graphs']:>8}{1e3 * r['eager_step_s']:>12.0f}"
            f"{1e3 * r['compiled_step_s']:>15.0f}{r['speedup']:>9.2f}x"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
