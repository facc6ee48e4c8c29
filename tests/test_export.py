"""``zoo export``: graphs written, loaded back and checked against the eager model; what cannot be exported
honestly is an error naming the graph (family parity tests live beside each family's tests)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tests.test_commands import zoo
from zoo.export import ExportError, ExportGraph, export_graph


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self.linear(x) * mask[..., None]
        return {"hidden": hidden, "pooled": hidden.sum(1) / mask.sum(1, keepdim=True)}


def scale_graph(module: nn.Module, **kwargs) -> ExportGraph:
    def inputs(batch, length):
        mask = torch.ones(batch, length)
        mask[-1, -1] = 0
        return torch.randn(batch, length, 4), mask

    return ExportGraph(
        name="scale",
        module=module.eval(),
        inputs=inputs(2, 5),
        check_inputs=inputs(3, 7),
        input_names=("x", "mask"),
        output_names=("pooled", "hidden"),
        dynamic_dims=({0: "batch", 1: "length"}, {0: "batch", 1: "length"}),
        **kwargs,
    )


@pytest.mark.parametrize("format", ["pt2", "onnx"])
def test_a_graph_with_dynamic_batch_and_length_matches_eager_on_other_sizes(tmp_path, format):
    entry = export_graph(scale_graph(Scale()), tmp_path, format)
    assert (tmp_path / entry["file"]).is_file()
    assert max(entry["max_abs_difference"].values()) <= 1e-5
    assert entry["inputs"][0] == {"name": "x", "dtype": "float32", "shape": ["batch", "length", 4]}
    assert [o["name"] for o in entry["outputs"]] == ["pooled", "hidden"]


class CountsCalls(Scale):
    """Python state read in ``forward``: traced once as a constant, so the export is not this model."""

    calls = 0

    def forward(self, x, mask):
        self.calls += 1
        return {name: value * self.calls for name, value in super().forward(x, mask).items()}


def test_an_export_that_does_not_match_the_eager_model_is_refused(tmp_path):
    with pytest.raises(ExportError, match=r"the exported 'scale' \(pt2\) differs from the eager model by"):
        export_graph(scale_graph(CountsCalls()), tmp_path, "pt2")


class DataDependent(Scale):
    def forward(self, x, mask):
        if mask.sum().item() > 4:  # a branch on a value: no single graph
            return super().forward(x, mask)
        return super().forward(-x, mask)


def test_an_untraceable_graph_is_an_error_naming_it(tmp_path):
    with pytest.raises(ExportError, match=r"torch.export could not trace graph 'scale'"):
        export_graph(scale_graph(DataDependent()), tmp_path, "pt2")
    with pytest.raises(ExportError, match="graphs export as one of"):
        export_graph(scale_graph(Scale()), tmp_path, "tflite")


def test_zoo_export_writes_programs_and_a_manifest(tmp_path):
    result = zoo(
        "export", "--config", "deit_tiny", "--model.init_args.model_kwargs={depth: 1}",
        "--format", "pt2", "--output", "exported", cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "exported" / "export.json").read_text())
    assert manifest["model"] == "zoo.vision.module.ImageClassifier" and manifest["checkpoint"] is None
    (graph,) = manifest["graphs"]
    assert graph["inputs"][0]["shape"] == ["batch", 3, 32, 32]
    program = torch.export.load(tmp_path / "exported" / graph["file"]).module()
    (logits,) = program(torch.randn(5, 3, 32, 32))  # a tuple in output order, as ONNX runtimes answer
    assert logits.shape == (5, 12)
    assert "zoo: wrote" in result.stdout and "export.json" in result.stdout


def test_zoo_export_errors_are_one_paragraph(tmp_path):
    missing = zoo(
        "export", "--config", "deit_tiny", "--ckpt_path", "nope.ckpt", "--output", "o", cwd=tmp_path
    )
    assert missing.returncode == 2 and "--ckpt_path nope.ckpt: no such file" in missing.stderr
    (tmp_path / "sharded.ckpt").mkdir()
    sharded = zoo(
        "export", "--config", "deit_tiny", "--ckpt_path", "sharded.ckpt", "--output", "o", cwd=tmp_path
    )
    assert sharded.returncode == 2 and "zoo consolidate sharded.ckpt" in sharded.stderr
    unknown = zoo("export", "--config", "deit_tiny", "--format", "tflite", "--output", "o", cwd=tmp_path)
    assert unknown.returncode == 2 and "exports as one of: pt2, onnx" in unknown.stderr
