"""``zoo export`` of every vision config (pt2 and ONNX, checked against eager) and of compressed checkpoints.

Models are the configs with one or two blocks (and a narrow two-stage Swin); the export itself checks parity
on a batch of 2 (traced) and 3; the manifest's numbers are asserted here, and the exported graph is also run
on a batch of 1 (what a served single request is). The compressed checkpoints are those of
configs/compression/deit_tiny_compress.yaml: pruned, then pruned and int8 (dynamic, torchao), plus torchao
static int8 and QAT, and the ``torch.ao`` int8 checkpoints written before the move to torchao.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from zoo.callbacks.compression import legacy
from zoo.callbacks.compression.quantization import (
    convert_qat_int8,
    prepare_qat_int8,
    quantize_dynamic_int8,
    quantize_static_int8,
)
from zoo.callbacks.compression.records import add_record, save_records
from zoo.callbacks.compression.structured import prune_transformer
from zoo.export import ExportError, export_model, main
from zoo.inference import load_trained_model
from zoo.vision.export import DynamicInt8Linear, TorchaoInt8Linear

from ..conftest import CONFIGS

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning"),
]

VISION = CONFIGS / "vision"
#: each config with 1-2 blocks: what is exported is the config's architecture, only shallower
TINY = {
    "vit_tiny": ["--model.init_args.model_kwargs={depth: 1}"],
    "deit_tiny": ["--model.init_args.model_kwargs={depth: 1}"],
    "deit_tiny_distilled": ["--model.init_args.model_kwargs={depth: 1}"],
    # two stages of two blocks: windows, shifted windows with their mask, and patch merging
    "swin_tiny": [
        "--model.init_args.model_kwargs={window_size: 4, depths: [2, 2], embed_dim: 24, num_heads: [1, 2]}"
    ],
    "vpt_shallow": ["--model.init_args.model_kwargs={depth: 1}"],
    "vpt_deep": ["--model.init_args.model_kwargs={depth: 2}"],
}
TOLERANCE = 1e-4


def config_args(name: str) -> list[str]:
    return ["--config", str(VISION / f"{name}.yaml"), *TINY[name]]


def exported_runner(folder, format: str):
    """The written ``classifier`` graph as a function of one image batch."""
    if format == "pt2":
        program = torch.export.load(folder / "classifier.pt2").module()
        return lambda images: program(images)[0]
    import onnxruntime

    session = onnxruntime.InferenceSession(
        str(folder / "classifier.onnx"), providers=["CPUExecutionProvider"]
    )
    return lambda images: torch.from_numpy(session.run(["logits"], {"image": images.numpy()})[0])


@pytest.mark.parametrize("name", list(TINY))
def test_every_vision_config_exports_its_classifier_within_tolerance(name, tmp_path):
    torch.manual_seed(0)
    module = load_trained_model(config_args(name), None).module
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = module(images)
    for format in ("pt2", "onnx"):
        (graph,) = export_model(module, tmp_path / format, format)
        assert graph["graph"] == "classifier" and graph["file"] == f"classifier.{format}"
        assert graph["inputs"] == [{"name": "image", "dtype": "float32", "shape": ["batch", 3, 32, 32]}]
        assert [o["name"] for o in graph["outputs"]] == ["logits"]
        assert graph["outputs"][0]["traced_shape"] == [2, 12]
        differences = graph["max_abs_difference"]
        assert set(differences) == {"trace_batch", "check_batch"}
        assert max(differences.values()) <= TOLERANCE, differences
        # the graph is the model's forward (what predict_step ranks), on a single image too
        exported = exported_runner(tmp_path / format, format)(images)
        torch.testing.assert_close(exported, expected, atol=TOLERANCE, rtol=0)
    if name == "deit_tiny_distilled":  # evaluated as DeiT does: the mean of the class and distillation heads
        with torch.no_grad():
            heads = module.forward_heads(images)
        torch.testing.assert_close(expected, (heads[0] + heads[1]) / 2, atol=1e-6, rtol=0)


def test_zoo_export_command_writes_the_manifest(tmp_path, capsys):
    main([*config_args("deit_tiny"), "--format", "pt2", "--output", str(tmp_path)])
    manifest = json.loads((tmp_path / "export.json").read_text())
    assert manifest["model"] == "zoo.vision.module.ImageClassifier" and manifest["checkpoint"] is None
    (graph,) = manifest["graphs"]
    assert graph["graph"] == "classifier" and max(graph["max_abs_difference"].values()) <= TOLERANCE
    assert (tmp_path / "classifier.pt2").is_file() and "classifier.pt2" in capsys.readouterr().out


# --------------------------------------------------------------------------- compressed checkpoints
def compressed_checkpoint(tmp_path, *steps: str) -> tuple[str, torch.nn.Module]:
    """A deit_tiny checkpoint compressed as the pipeline config does (prune heads and MLP units, int8
    dynamic), or otherwise quantized (``*-torch.ao``: the pre-torchao format), saved with its records; and the
    compressed module itself."""
    module = load_trained_model(config_args("deit_tiny"), None).module
    images = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if "prune" in steps:
            prune_transformer(module, head_fraction=0.34, mlp_fraction=0.5, importance="l2")
        if "int8_dynamic" in steps:
            quantize_dynamic_int8(module)
        if "int8_dynamic-torch.ao" in steps:
            quantize_dynamic_int8(module, backend="torch.ao")
        if "int8_static" in steps:
            quantize_static_int8(module, images)
        if "int8_qat" in steps:  # prepared, one forward in training mode, converted
            prepare_qat_int8(module)
            module.train()(images[0])
            convert_qat_int8(module.eval())
        if "int8_static-torch.ao" in steps:  # the record and modules the torch.ao path wrote
            layers = [n for n, m in module.named_modules() if type(m) in (torch.nn.Linear, torch.nn.Conv2d)]
            record = {"kind": "int8_static", "qat": False, "engine": "x86", "layers": layers}
            legacy.prepare(module, record)
            with torch.no_grad():
                for x in images:
                    module(x)
            legacy.convert(module)
            add_record(module, record)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    save_records(module, checkpoint)
    path = tmp_path / f"{'-'.join(steps)}.ckpt"
    torch.save(checkpoint, path)
    return str(path), module.eval()


@pytest.mark.parametrize(
    "steps",
    [
        ("prune",),
        ("prune", "int8_dynamic"),
        ("prune", "int8_dynamic-torch.ao"),
        ("int8_static",),
        ("int8_qat",),
    ],
    ids=["pruned", "pruned-int8", "pruned-int8-torch.ao", "int8-static", "int8-qat"],
)
def test_pruned_and_int8_checkpoints_export_to_pt2_and_onnx(steps, tmp_path):
    path, compressed = compressed_checkpoint(tmp_path, *steps)
    trained = load_trained_model(config_args("deit_tiny"), path)  # records replayed by load_weights
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        served = trained.module(images)
        torch.testing.assert_close(served, compressed(images), atol=0, rtol=0)
    quantized = steps[-1].startswith("int8")
    fc1 = trained.module.model.blocks[0].mlp.fc1
    if quantized:  # the loaded module keeps its int8 kernels; the graph gets the rewrite
        if steps[-1].endswith("torch.ao"):
            assert type(fc1).__module__.startswith("torch.ao.nn.quantized")
        else:
            assert type(fc1) is torch.nn.Linear and type(fc1.weight).__name__ == "Int8Tensor"
    for format in ("pt2", "onnx"):
        folder = tmp_path / format
        (entry,) = export_model(trained.module, folder, format)
        # ONNX Runtime's float kernels can round an int8 activation the other way
        # (zoo.vision.export.classifier_graph): its tolerance is a tenth of the logits' spread
        tolerance = 0.1 * served.std().item() if quantized and format == "onnx" else TOLERANCE
        assert entry["tolerance"] == TOLERANCE or quantized
        assert max(entry["max_abs_difference"].values()) <= max(entry["tolerance"], TOLERANCE)
        exported = exported_runner(folder, format)(images)
        torch.testing.assert_close(exported, served, atol=tolerance, rtol=0)
        if format == "pt2" and quantized:
            # the pt2 graph computes exactly what the int8 kernel computes, and stores int8 weights
            assert entry["max_abs_difference"] == {"trace_batch": 0.0, "check_batch": 0.0}
            weights = torch.export.load(folder / "classifier.pt2").state_dict
            assert weights["module.blocks.0.mlp.fc1.weight_int8"].dtype == torch.int8
    rewrites = (DynamicInt8Linear, TorchaoInt8Linear)
    assert not any(isinstance(m, rewrites) for m in trained.module.modules())  # module untouched


def test_dynamic_int8_rewrite_matches_the_kernel_on_awkward_activations():
    """Zero, tiny, one-signed and large activation ranges: the rewritten layer's integer arithmetic equals
    fbgemm's (the scale / zero-point special cases included)."""
    from torch.ao.quantization import quantize_dynamic

    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(64, 48)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = quantize_dynamic(layer, {torch.nn.Linear}, dtype=torch.qint8)
    rewritten = DynamicInt8Linear(quantized[0])
    exported = torch.export.export(
        torch.nn.Sequential(rewritten), (torch.randn(2, 5, 64),), dynamic_shapes=({0: torch.export.Dim("b")},)
    ).module()
    base = torch.randn(3, 5, 64)
    for x in (base, base * 1e-6, base.abs(), -base.abs(), torch.zeros_like(base), base * 300, base + 7):
        torch.testing.assert_close(exported(x), quantized(x), atol=0, rtol=0)


def test_torchao_int8_rewrite_matches_the_kernel_on_awkward_activations():
    """Zero, tiny, one-signed and large activation ranges, per-token symmetric (dynamic) and asymmetric (QAT)
    and calibrated (static) scales: the rewritten layer's arithmetic equals torchao's bit for bit."""
    torch.manual_seed(0)
    calibration = torch.randn(4, 5, 64)
    layers = {"dynamic": torch.nn.Linear(64, 48), "static": torch.nn.Linear(64, 48)}
    quantize_dynamic_int8(layers["dynamic"])
    quantize_static_int8(layers["static"], [calibration])
    qat = torch.nn.Sequential(torch.nn.Linear(64, 48))
    prepare_qat_int8(qat)
    convert_qat_int8(qat)
    layers["qat"] = qat[0]
    base = torch.randn(3, 5, 64)
    for kind, layer in layers.items():
        exported = torch.export.export(
            TorchaoInt8Linear(layer), (torch.randn(2, 5, 64),), dynamic_shapes=({0: torch.export.Dim("b")},)
        ).module()
        for x in (base, base * 1e-6, base.abs(), -base.abs(), torch.zeros_like(base), base * 300, base + 7):
            torch.testing.assert_close(exported(x), layer(x), atol=0, rtol=0, msg=kind)


def test_torch_ao_static_int8_checkpoint_fails_with_an_export_error_naming_the_layer(tmp_path):
    path, _ = compressed_checkpoint(tmp_path, "int8_static-torch.ao")
    trained = load_trained_model(config_args("deit_tiny"), path)
    for format in ("pt2", "onnx"):
        with pytest.raises(
            ExportError, match=r"static int8.*torch\.export cannot trace.*neither pt2 nor onnx"
        ):
            export_model(trained.module, tmp_path / format, format)
    with pytest.raises(ExportError, match=r"--format timm: this network is quantized"):
        export_model(trained.module, tmp_path / "timm", "timm")
