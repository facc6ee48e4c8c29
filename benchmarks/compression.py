"""How much smaller and faster does compression make a trained DeiT-Ti, and what does it cost in accuracy?

Stages, each scored on the embedded validation images (parameters, size on disk = ``torch.save`` of the state
dict, CPU latency at batch 1 and 32, accuracy):

- ``float32``: the trained model (``--checkpoint``, or trained here with configs/vision/deit_tiny.yaml).
- ``int8 dynamic``: every Linear quantized (``Quantization(mode="dynamic")``'s function, torchao
  ``Int8DynamicActivationInt8WeightConfig``), run eagerly and under ``torch.compile`` (inductor fuses the
  activation quantization, int8 GEMM and rescale: torchao's CPU speed-up needs it), next to the old
  ``torch.ao`` path (fbgemm kernels, eager) and a compiled float32 model, so each compiled row has its baseline.
- ``pruned``: a third of the heads and half of the MLP units removed (L2 norm), no fine-tune.
- ``pruned + fine-tune``: configs/compression/deit_tiny_compress.yaml run through the ``zoo`` CLI: the dense model
  is teacher and starting point, pruning, ``--finetune-epochs`` of distillation fine-tuning (its last.ckpt).
- ``pipeline (+ int8)``: the same run's ``compressed.ckpt`` (int8 after fine-tuning), reloaded from disk;
  eager and compiled.
- ``int4 GPTQ`` and ``k-means 16``: weight-only 4-bit GPTQ and 16-value weight sharing of the dense model
  (storage savings; both dequantize to float on CPU, so no speed-up is expected).

Latencies are medians over ``--repeats`` calls, the models interleaved call by call so that load from other
processes hits all of them alike; speed-ups are ratios to (eager) float32 from the same run. Compiled models
are compiled (``torch.compile``, inductor, one graph per batch size) during the warm-up calls, outside the
timings; ``compile_seconds`` in the JSON is their first batch-32 call.

    OMP_NUM_THREADS=1 python benchmarks/compression.py \
        --checkpoint runs/dense/lightning_logs/version_0/checkpoints/last.ckpt

Prints a table and writes ``benchmarks/results/compression.json``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch

from zoo.callbacks import load_teacher
from zoo.callbacks.compression import (
    load_compressed,
    prune_transformer,
    quantize_dynamic_int8,
    quantize_int4_gptq,
    share_weights,
    state_dict_bytes,
)
from zoo.cli import ZooCLI
from zoo.datamodules import ImageClassificationDataModule
from zoo.vision import ImageClassifier

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "compression.json"
DENSE_CONFIG = ROOT / "configs" / "vision" / "deit_tiny.yaml"
PIPELINE_CONFIG = ROOT / "configs" / "compression" / "deit_tiny_compress.yaml"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def train_dense(work_dir: Path) -> Path:
    root = work_dir / "dense"
    ZooCLI(args=["fit", "--config", str(DENSE_CONFIG), f"--trainer.default_root_dir={root}", *QUIET])
    return max(root.rglob("last.ckpt"), key=os.path.getmtime)


def run_pipeline(checkpoint: Path, work_dir: Path, epochs: int, extra: list[str]) -> tuple[Path, Path, float]:
    root = work_dir / "pipeline"
    start = time.perf_counter()
    cli = ZooCLI(
        args=[
            "fit",
            "--config",
            str(PIPELINE_CONFIG),
            f"--trainer.max_epochs={epochs}",
            f"--trainer.default_root_dir={root}",
            *QUIET,
            *extra,
            f"--trainer.callbacks.init_args.teacher_checkpoint={checkpoint}",  # the last callback: Distillation
        ]
    )
    seconds = time.perf_counter() - start
    quantization = next(c for c in cli.trainer.callbacks if type(c).__name__ == "Quantization")
    last = max(root.rglob("last.ckpt"), key=os.path.getmtime)
    return last, quantization.saved_to, seconds


def fresh_model(hparams: dict) -> ImageClassifier:
    return ImageClassifier(**{k: v for k, v in hparams.items() if not k.startswith("_")})


def count_parameters(model: torch.nn.Module) -> int:
    """Weights the model computes with: quantized layers keep theirs as packed buffers (``weight()`` methods),
    weight-shared layers as codebook indices."""
    packed = sum(
        m.weight().numel()
        for m in model.modules()
        if callable(getattr(m, "weight", None)) and not isinstance(m.weight, torch.Tensor)
    )
    shared = sum(
        m.weight_indices.numel() - m.weight_codebook.numel()
        for m in model.modules()
        if hasattr(m, "weight_codebook")
    )
    return sum(p.numel() for p in model.parameters()) + packed + shared


def accuracy(model: torch.nn.Module, loader) -> float:
    correct = total = 0
    with torch.inference_mode():
        for batch in loader:
            correct += int((model(batch["image"]).argmax(-1) == batch["label"]).sum())
            total += len(batch["label"])
    return correct / total


def latencies(models: dict[str, torch.nn.Module], batch: int, repeats: int) -> dict[str, float]:
    x = torch.randn(batch, 3, 32, 32)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():  # warm-up (first-call allocations, kernel selection)
            model(x)
            model(x)
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def build_rows(models: dict[str, torch.nn.Module], val, batch1: dict, batch32: dict) -> list[dict]:
    dense = models["float32"]
    rows = []
    base_acc = accuracy(dense, val)
    base_size = state_dict_bytes(dense)
    for name, model in models.items():
        acc = base_acc if name == "float32" else accuracy(model, val)
        size = state_dict_bytes(model)
        row = {
            "stage": name,
            "parameters": count_parameters(model),
            "size_bytes": size,
            "size_vs_float32": size / base_size,
            "val_accuracy": acc,
            "accuracy_drop_points": 100 * (base_acc - acc),
        }
        if name in batch32:
            row.update(
                latency_b1_ms=1000 * batch1[name],
                latency_b32_ms=1000 * batch32[name],
                speedup_b1=batch1["float32"] / batch1[name],
                speedup_b32=batch32["float32"] / batch32[name],
            )
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    header = f"{'stage':34} {'params':>9} {'size MB':>8} {'size':>6} {'b1 ms':>7} {'b32 ms':>8} {'x b32':>6} {'acc':>7} {'drop':>6}"
    print(header)
    print("-" * len(header))
    for r in rows:
        b1 = f"{r['latency_b1_ms']:7.2f}" if "latency_b1_ms" in r else f"{'-':>7}"
        b32 = f"{r['latency_b32_ms']:8.1f}" if "latency_b32_ms" in r else f"{'-':>8}"
        x32 = f"{r['speedup_b32']:6.2f}" if "speedup_b32" in r else f"{'-':>6}"
        print(
            f"{r['stage']:34} {r['parameters'] / 1e6:8.2f}M {r['size_bytes'] / 1e6:8.2f} {r['size_vs_float32']:6.1%}"
            f" {b1} {b32} {x32} {r['val_accuracy']:7.2%} {r['accuracy_drop_points']:6.2f}"
        )


START = time.perf_counter()


def progress(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f} s] {message}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, help="trained configs/vision/deit_tiny.yaml checkpoint")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/compression_benchmark"))
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads for the timings; 1 keeps them stable on a shared machine (with 2 threads on 2 busy "
        "cores the same model's batch-32 time swung from 44 ms to 1.5 s between runs)",
    )
    parser.add_argument(
        "--pipeline-run", type=Path, help="reuse a finished pipeline run's directory instead of fitting again"
    )
    parser.add_argument("--limit-train-batches", type=int, help="shorten the fine-tune (smoke runs)")
    parser.add_argument("--no-extras", action="store_true", help="skip the int4 GPTQ and k-means rows")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")

    checkpoint = args.checkpoint or train_dense(args.work_dir)
    hparams = torch.load(checkpoint, map_location="cpu", weights_only=True)["hyper_parameters"]
    dense = load_teacher(checkpoint=checkpoint).eval()
    data = ImageClassificationDataModule(batch_size=64, train_size=7680)
    data.setup("fit")
    val = data.val_dataloader()

    models: dict[str, torch.nn.Module] = {"float32": dense}
    models["int8 dynamic (torch.ao, old)"] = copy.deepcopy(dense)
    quantize_dynamic_int8(models["int8 dynamic (torch.ao, old)"], backend="torch.ao")
    models["int8 dynamic (torchao)"] = copy.deepcopy(dense)
    quantize_dynamic_int8(models["int8 dynamic (torchao)"])
    models["pruned (no fine-tune)"] = copy.deepcopy(dense)
    prune_transformer(models["pruned (no fine-tune)"], head_fraction=0.34, mlp_fraction=0.5, importance="l2")

    extra = (
        []
        if args.limit_train_batches is None
        else [f"--trainer.limit_train_batches={args.limit_train_batches}"]
    )
    progress("pruned and int8 variants built; running the pipeline config")
    if args.pipeline_run is None:
        last, compressed, finetune_seconds = run_pipeline(
            checkpoint, args.work_dir, args.finetune_epochs, extra
        )
    else:
        last = max(args.pipeline_run.rglob("last.ckpt"), key=os.path.getmtime)
        compressed, finetune_seconds = (
            max(args.pipeline_run.rglob("compressed.ckpt"), key=os.path.getmtime),
            None,
        )
    models["pruned + fine-tune"] = load_compressed(fresh_model(hparams), last).eval()
    models["pipeline (+ int8)"] = load_compressed(fresh_model(hparams), compressed).eval()
    for name in ("float32", "int8 dynamic (torchao)", "pipeline (+ int8)"):
        models[f"{name} compiled"] = torch.compile(copy.deepcopy(models[name]))
    if not args.no_extras:
        calibration = [b["image"] for _, b in zip(range(4), data.train_dataloader())]
        models["int4 GPTQ (weight-only)"] = copy.deepcopy(dense)
        quantize_int4_gptq(models["int4 GPTQ (weight-only)"], calibration, group_size=64)
        models["k-means 16 (no fine-tune)"] = copy.deepcopy(dense)
        share_weights(models["k-means 16 (no fine-tune)"], clusters=16)

    progress("models ready; compiling")
    torch.set_num_threads(args.threads)
    compile_seconds = {}
    with torch.inference_mode():
        for name, model in models.items():
            if name.endswith("compiled"):
                start = time.perf_counter()
                model(torch.randn(32, 3, 32, 32))
                compile_seconds[name] = time.perf_counter() - start
    progress("compiled; timing")
    timed = {k: v for k, v in models.items() if not k.startswith(("int4", "k-means"))}
    batch32 = latencies(timed, 32, args.repeats)
    batch1 = latencies(timed, 1, args.repeats * 3)
    progress("timed; evaluating")
    rows = build_rows(models, val, batch1, batch32)
    print_table(rows)
    result = {
        "checkpoint": str(checkpoint),
        "finetune_epochs": args.finetune_epochs,
        "finetune_seconds": finetune_seconds,
        "compressed_checkpoint_bytes": os.path.getsize(compressed),
        "torch": torch.__version__,
        "torchao": importlib.metadata.version("torchao"),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "load_average_1min": os.getloadavg()[0],
        "compile_seconds": compile_seconds,
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {args.output}")


if __name__ == "__main__":
    main()
