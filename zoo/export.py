"""``zoo export``: a trained model's inference graphs as ``torch.export`` programs or ONNX, checked on export.

Every family says what to export through one hook, ``ZooModule.export_graphs()``: a list of ``ExportGraph``
(a module taking tensors, inputs to trace it with, a second batch of other sizes to check it with, names, and
which input dimensions vary). The default is the module's ``forward`` on ``example_inputs()`` with a dynamic
batch; families whose inference is more than one call (a diffusion model's denoiser and decoder, a decoder
step with its cache, BEVFormer's frame with the previous BEV) list several graphs. Sampling loops, beam search
and temporal queues stay in Python, around the exported graphs.

An exported graph takes its inputs positionally and returns a tuple of tensors in ``output_names`` order, in
both formats. Writing a graph always checks it: the saved file is loaded back (``torch.export.load``, or an onnxruntime
session) and run on the trace batch and on the check batch; the largest absolute difference to the eager
model goes into ``export.json`` next to the files, and an export beyond the graph's tolerance is an error.

Formats of other libraries (a diffusers pipeline folder, a Hugging Face or fair-esm ESM-2, a timm state
dict) are the family's: ``ZooModule.library_exports()`` maps a format name to the function writing it.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from zoo.errors import ZooError

__all__ = ["GRAPH_FORMATS", "ExportError", "ExportGraph", "export_graph", "main", "max_difference"]

GRAPH_FORMATS = ("pt2", "onnx")
MANIFEST = "export.json"


class ExportError(ZooError):
    """A graph that cannot be exported in the asked format, or whose export does not match the eager model."""


@dataclass
class ExportGraph:
    """One graph to export.

    Args:
        name: the file stem (``classifier`` -> ``classifier.pt2`` / ``classifier.onnx``).
        module: an eval-mode module taking ``inputs`` positionally; it returns a tensor, a tuple of tensors or
            a dict holding ``output_names``.
        inputs: what the graph is traced with. A dimension of size 0 or 1 is baked in as a constant by
            ``torch.export``, so dynamic dimensions are at least 2 here.
        check_inputs: a second batch whose dynamic dimensions have other sizes (parity check).
        input_names / output_names: names in the ONNX graph and in ``export.json``.
        dynamic_dims: per input, ``{axis: symbol}`` for the axes that vary (``{0: "batch", 1: "length"}``);
            inputs sharing a symbol share the size. ``None`` for an input whose shape is fixed.
        dim_ranges: ``{symbol: (min, max)}``, where a symbol has bounds (e.g. the positions a model has).
        tolerance: the largest absolute difference to the eager model accepted (fp32).
    """

    name: str
    module: nn.Module
    inputs: tuple[Tensor, ...]
    check_inputs: tuple[Tensor, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_dims: tuple[Mapping[int, str] | None, ...] = ()
    dim_ranges: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    tolerance: float = 1e-4

    def __post_init__(self) -> None:
        if len(self.input_names) != len(self.inputs):
            raise ValueError(f"graph {self.name!r}: {len(self.inputs)} inputs but names {self.input_names}")
        if self.dynamic_dims and len(self.dynamic_dims) != len(self.inputs):
            raise ValueError(f"graph {self.name!r}: dynamic_dims needs one entry per input")

    def outputs_module(self) -> nn.Module:
        """The module with its outputs as a tuple in ``output_names`` order (what both exporters want)."""
        return _TupleOutputs(self.module, self.output_names).eval()

    def dynamic_shapes(self) -> tuple[dict[int, Any] | None, ...] | None:
        if not self.dynamic_dims:
            return None
        symbols: dict[str, Any] = {}
        shapes = []
        for dims in self.dynamic_dims:
            if not dims:
                shapes.append(None)
                continue
            entry = {}
            for axis, symbol in dims.items():
                if symbol not in symbols:
                    low, high = self.dim_ranges.get(symbol, (1, None))
                    symbols[symbol] = torch.export.Dim(symbol, min=low, max=high)
                entry[axis] = symbols[symbol]
            shapes.append(entry)
        return tuple(shapes)

    def describe(self) -> dict[str, Any]:
        """The graph's signature for ``export.json``: names, dtypes, shapes with symbols for dynamic axes."""

        def shape(tensor: Tensor, dims: Mapping[int, str] | None) -> list[int | str]:
            return [(dims or {}).get(axis, size) for axis, size in enumerate(tensor.shape)]

        dynamic = self.dynamic_dims or (None,) * len(self.inputs)
        with torch.no_grad():
            outputs = self.outputs_module()(*self.inputs)
        return {
            "inputs": [
                {"name": n, "dtype": str(t.dtype).removeprefix("torch."), "shape": shape(t, d)}
                for n, t, d in zip(self.input_names, self.inputs, dynamic)
            ],
            "outputs": [
                {"name": n, "dtype": str(t.dtype).removeprefix("torch."), "traced_shape": list(t.shape)}
                for n, t in zip(self.output_names, outputs)
            ],
        }


class _TupleOutputs(nn.Module):
    """``module``'s outputs as a tuple of tensors, picked by name from a dict (or a ``ModelOutput``)."""

    def __init__(self, module: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.module = module
        self.names = tuple(names)

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        out = self.module(*inputs)
        if isinstance(out, Mapping):
            return tuple(out[name] for name in self.names)
        if isinstance(out, Tensor):
            return (out,)
        return tuple(out)


def default_graph(module: nn.Module, example_inputs: Callable[[int], tuple[Tensor, ...]], name: str,
                  output_name: str = "output") -> ExportGraph:  # fmt: skip
    """``forward`` on ``example_inputs(batch)`` with a dynamic batch: the one graph most families need."""
    inputs, check = example_inputs(2), example_inputs(3)
    return ExportGraph(
        name=name,
        module=module,
        inputs=inputs,
        check_inputs=check,
        input_names=tuple(f"input_{i}" for i in range(len(inputs))) if len(inputs) > 1 else ("input",),
        output_names=(output_name,),
        dynamic_dims=tuple({0: "batch"} if isinstance(t, Tensor) else None for t in inputs),
    )


# --------------------------------------------------------------------------- writing and checking
def max_difference(expected: Sequence[Tensor], actual: Sequence[Any]) -> float:
    """The largest absolute difference over all outputs (shape mismatches are an error, not a number)."""
    worst = 0.0
    for want, got in zip(expected, actual, strict=True):
        got = torch.as_tensor(got, device=want.device)
        if tuple(got.shape) != tuple(want.shape):
            raise ExportError(f"exported output has shape {tuple(got.shape)}, eager {tuple(want.shape)}")
        if want.numel():
            worst = max(worst, (want.double() - got.double()).abs().max().item())
    return worst


def _eager(graph: ExportGraph, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    with torch.no_grad():
        return tuple(t.detach() for t in graph.outputs_module()(*inputs))


def _export_program(graph: ExportGraph):
    shapes = graph.dynamic_shapes()
    try:
        with torch.no_grad():  # the wrapper's ``*inputs`` is one argument: its shapes are one tuple
            return torch.export.export(
                graph.outputs_module(), graph.inputs, dynamic_shapes=None if shapes is None else (shapes,)
            )
    except Exception as error:
        raise ExportError(
            f"torch.export could not trace graph {graph.name!r}: {_first_line(error)}"
        ) from error


def _write_pt2(graph: ExportGraph, folder: Path) -> tuple[Path, Callable[[tuple[Tensor, ...]], Any]]:
    path = folder / f"{graph.name}.pt2"
    torch.export.save(_export_program(graph), path)
    runner = torch.export.load(path).module()

    def run(inputs: tuple[Tensor, ...]) -> Any:
        with torch.no_grad():
            return runner(*inputs)

    return path, run


def _write_onnx(graph: ExportGraph, folder: Path) -> tuple[Path, Callable[[tuple[Tensor, ...]], Any]]:
    from zoo.extras import require

    require("onnxscript", "export", "zoo export --format onnx")
    ort = require("onnxruntime", "export", "zoo export --format onnx")
    path = folder / f"{graph.name}.onnx"
    program = _export_program(graph)
    big = sum(p.numel() * p.element_size() for p in graph.module.parameters()) > 1_500_000_000
    try:
        onnx_program = torch.onnx.export(
            program,
            graph.inputs,
            input_names=list(graph.input_names),
            output_names=list(graph.output_names),
            dynamo=True,
            optimize=True,
            verbose=False,
        )
        onnx_program.save(str(path), external_data=big)
    except Exception as error:
        raise ExportError(
            f"graph {graph.name!r} has no ONNX lowering: {_first_line(error)} "
            "(the pt2 format keeps every PyTorch operator)"
        ) from error
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = [i.name for i in session.get_inputs()]

    def run(inputs: tuple[Tensor, ...]) -> Any:
        # inputs the graph does not read (e.g. a constant mask) are dropped from the ONNX signature
        named = dict(zip(graph.input_names, inputs))
        return session.run(None, {name: named[name].detach().cpu().numpy() for name in feeds})

    return path, run


WRITERS = {"pt2": _write_pt2, "onnx": _write_onnx}


def export_graph(graph: ExportGraph, folder: str | Path, format: str = "pt2") -> dict[str, Any]:
    """Write ``graph`` into ``folder`` in ``format``, load it back and compare it with the eager module on
    both batches. Returns the manifest entry (file, signature, differences, seconds)."""
    if format not in WRITERS:
        raise ExportError(f"--format {format!r}: graphs export as one of {GRAPH_FORMATS}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    path, run = WRITERS[format](graph, folder)
    seconds = time.perf_counter() - started
    differences = {
        "trace_batch": max_difference(_eager(graph, graph.inputs), run(graph.inputs)),
        "check_batch": max_difference(_eager(graph, graph.check_inputs), run(graph.check_inputs)),
    }
    entry = {
        "graph": graph.name,
        "file": path.name,
        "format": format,
        **graph.describe(),
        "max_abs_difference": differences,
        "tolerance": graph.tolerance,
        "export_seconds": round(seconds, 2),
    }
    worst = max(differences.values())
    if worst > graph.tolerance:
        raise ExportError(
            f"the exported {graph.name!r} ({format}) differs from the eager model by {worst:.3g} "
            f"(tolerance {graph.tolerance:g}); {path} was written but should not be used"
        )
    return entry


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


# --------------------------------------------------------------------------- command
def export_model(module: nn.Module, folder: str | Path, format: str) -> list[dict[str, Any]]:
    """Every graph of ``module.export_graphs()`` (or every file of a library format) written into ``folder``."""
    folder = Path(folder)
    library = module.library_exports() if hasattr(module, "library_exports") else {}
    if format in library:
        folder.mkdir(parents=True, exist_ok=True)
        return [{"format": format, "files": [str(p.relative_to(folder)) for p in library[format](folder)]}]
    if format not in GRAPH_FORMATS:
        known = ", ".join((*GRAPH_FORMATS, *library))
        raise ExportError(f"--format {format!r}: {type(module).__name__} exports as one of: {known}")
    if not hasattr(module, "export_graphs"):
        raise ExportError(f"{type(module).__name__} does not say what to export (no export_graphs())")
    return [export_graph(graph, folder, format) for graph in module.export_graphs()]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="zoo export",
        description="Export a trained model: its inference graphs as torch.export programs (pt2) or ONNX, "
        "each checked against the eager model on two batch sizes, or the files another library loads "
        "(diffusers, hf, fair-esm, timm: whichever the model offers). Other --model.*/--data.* options "
        "are passed to the config as in `zoo predict`.",
    )
    parser.add_argument("--config", action="append", required=True, help="the model's config (repeatable)")
    parser.add_argument("--ckpt_path", help="the trained checkpoint (a single file); default: untrained")
    parser.add_argument("--format", default="pt2", help="pt2 (default), onnx, or a library format")
    parser.add_argument("--output", required=True, help="the folder to write (created)")
    args, overrides = parser.parse_known_args(argv)
    from zoo.inference import load_trained_model

    config_args = [item for path in args.config for item in ("--config", path)] + overrides
    trained = load_trained_model(config_args, args.ckpt_path)
    entries = export_model(trained.module, args.output, args.format)
    manifest = {
        "model": f"{type(trained.module).__module__}.{trained.name}",
        "checkpoint": trained.checkpoint,
        "format": args.format,
        "torch": torch.__version__,
        "graphs" if args.format in GRAPH_FORMATS else "written": entries,
    }
    output = Path(args.output)
    (output / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    for entry in entries:
        if "graph" in entry:
            worst = max(entry["max_abs_difference"].values())
            print(f"zoo: wrote {output / entry['file']} (max |exported - eager| {worst:.2g})")
        else:
            print(f"zoo: wrote {args.format} files in {output}: {', '.join(entry['files'])}")
    print(f"zoo: signatures and checks in {output / MANIFEST}")
