"""CPU inference latency of each family's exported graphs: eager vs ``torch.compile`` vs the ``torch.export``
program vs onnxruntime, at batch 1 and 32, side by side in one run.

Every graph of ``module.export_graphs()`` (what ``zoo export`` writes) is built from the family's default
config with its initial weights (latency does not depend on the values), exported to pt2 and ONNX in a
temporary folder, and timed on the same inputs: the trace inputs repeated along their ``batch`` axes to the
batch size. Each figure is the median of ``--repeats`` calls after warm-up; the ratios are eager time over
each runner's time (above 1 = faster than eager). Prints a table, writes JSON.

    OMP_NUM_THREADS=1 python benchmarks/export.py [--families vision protein ...] [--batches 1 32]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from zoo.export import ExportGraph, export_graph
from zoo.inference import load_trained_model

RESULTS = Path(__file__).resolve().parent / "results"

#: family -> the config (and overrides) whose graphs are timed
FAMILIES: dict[str, list[str]] = {
    "vision": ["--config", "deit_tiny"],
    "protein": ["--config", "esm2_t6_8M"],
    "multitask": ["--config", "configs/multitask/arithmetic.yaml"],
    "diffusion": ["--config", "configs/diffusion/ldm_unet_class.yaml"],
    "bev": ["--config", "configs/bev/bevformer_cpu.yaml"],
}


def at_batch(graph: ExportGraph, inputs: tuple[torch.Tensor, ...], batch: int) -> tuple[torch.Tensor, ...]:
    """``inputs`` with every ``batch`` axis resized to ``batch`` by repeating rows."""
    resized = []
    for tensor, dims in zip(inputs, graph.dynamic_dims or (None,) * len(inputs)):
        for axis, symbol in (dims or {}).items():
            if symbol == "batch":
                rows = torch.arange(batch) % tensor.shape[axis]
                tensor = tensor.index_select(axis, rows)
        resized.append(tensor)
    return tuple(resized)


def median_seconds(run: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def runners(graph: ExportGraph, folder: Path) -> dict[str, Callable[[tuple], object]]:
    """name -> a function running the graph on positional inputs, for each way of running it."""
    eager = graph.outputs_module()
    compiled = torch.compile(graph.outputs_module(), dynamic=True)
    export_graph(graph, folder, "pt2")
    program = torch.export.load(folder / f"{graph.name}.pt2").module()
    found: dict[str, Callable[[tuple], object]] = {
        "eager": lambda x: eager(*x),
        "compile": lambda x: compiled(*x),
        "pt2": lambda x: program(*x),
    }
    try:
        import onnxruntime as ort

        export_graph(graph, folder, "onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(
            str(folder / f"{graph.name}.onnx"), options, providers=["CPUExecutionProvider"]
        )
        feeds = [i.name for i in session.get_inputs()]

        def run_onnx(x):
            named = dict(zip(graph.input_names, x))
            return session.run(None, {name: named[name].numpy() for name in feeds})

        found["onnxruntime"] = run_onnx
    except Exception as error:  # a graph with no ONNX lowering is reported, not fatal
        print(f"  {graph.name}: no ONNX ({type(error).__name__}: {str(error).splitlines()[0][:120]})")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for family in args.families:
            trained = load_trained_model(FAMILIES[family], None)
            for graph in trained.module.export_graphs():
                run = runners(graph, Path(tmp))
                for batch in args.batches:
                    inputs = at_batch(graph, graph.inputs, batch)
                    seconds = {
                        name: median_seconds(lambda r=r, x=inputs: r(x), args.repeats)
                        for name, r in run.items()
                    }
                    row = {"family": family, "graph": graph.name, "batch": batch,
                           **{f"{k}_ms": round(v * 1e3, 3) for k, v in seconds.items()},
                           **{f"{k}_speedup": round(seconds["eager"] / v, 2) for k, v in seconds.items() if k != "eager"}}  # fmt: skip
                    rows.append(row)
                    ratios = "  ".join(
                        f"{k} {seconds['eager'] / v:.2f}x" for k, v in seconds.items() if k != "eager"
                    )
                    print(f"{family:10s} {graph.name:18s} batch {batch:3d}  eager {seconds['eager'] * 1e3:8.2f} ms  {ratios}", flush=True)  # fmt: skip
    result = {"threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "export.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
