"""Export of the multitask model: a graph per task, an encoder and a cached decoder step per generation task.

The step graph takes its cache as a tensor; a Python greedy loop around the exported encoder and step must
write ``MultitaskModule.generate``'s tokens exactly, with the pt2 program and with the ONNX model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from zoo.export import export_model
from zoo.multitask import MultitaskModule, MultitaskTransformer, TaskSpec
from zoo.multitask.graphs import DecoderStep, TaskEncoder, greedy_decode, token_batch
from zoo.multitask.vocab import EOS_ID

VOCAB = 20
CAPACITY = 10
TASKS = [
    TaskSpec("cls", "sequence_classification", num_classes=3),
    TaskSpec("gen", "generation", max_target_length=CAPACITY),
]


def sharpen(model: MultitaskTransformer) -> MultitaskTransformer:
    """Larger random weights: an untrained decoder then writes varied tokens, rows ending after 1 to 5 tokens
    and rows running to the capacity, instead of one token repeated everywhere."""
    torch.manual_seed(2)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(std=0.4)
    return model


@pytest.fixture(scope="module")
def module() -> MultitaskModule:
    torch.manual_seed(0)
    kwargs = {
        "d_model": 32,
        "num_heads": 4,
        "num_kv_heads": 2,
        "decoder_layers": 2,
    }  # grouped-query attention
    module = MultitaskModule(VOCAB, TASKS, model_name="multitask_tiny", model_kwargs=kwargs).eval()
    sharpen(module.model)
    return module


def test_graphs_fix_the_task_and_take_dynamic_batch_and_length(module):
    graphs = {graph.name: graph for graph in module.export_graphs()}
    assert list(graphs) == ["cls", "gen_encoder", "gen_decoder_step"]
    assert graphs["cls"].input_names == graphs["gen_encoder"].input_names == ("input_ids", "padding_mask")
    step = graphs["gen_decoder_step"]
    assert step.input_names == ("token_ids", "memory", "memory_mask", "cache", "position")
    assert step.output_names == ("logits", "updated_cache")
    described = {entry["name"]: entry["shape"] for entry in step.describe()["inputs"]}
    assert described["memory"] == ["batch", "length", 32]
    assert described["cache"] == [
        2,
        2,
        "batch",
        2,
        CAPACITY,
        8,
    ]  # layers, keys/values, ..., capacity, head dim


@pytest.mark.parametrize(
    "kwargs",
    [
        {"positions": "rotary", "num_kv_heads": 2},
        {"positions": "sinusoidal", "sharing": "adapters"},
    ],
    ids=["rotary-gqa", "sinusoidal-adapters"],
)
def test_the_functional_step_decodes_like_generate(kwargs):
    """Eager, before any export: the step with its cache as a tensor is the cached decoder, token for token."""
    torch.manual_seed(0)
    model = MultitaskTransformer(
        VOCAB, TASKS, d_model=32, num_heads=4, num_layers=1, decoder_layers=2, **kwargs
    )
    module = MultitaskModule(VOCAB, TASKS, model_name="multitask_tiny")
    module.model = sharpen(model).eval()
    input_ids, padding_mask = token_batch(VOCAB, 8, 9, seed=3)
    expected = module.generate("gen", input_ids, padding_mask)
    encoder, step = TaskEncoder(model, "gen").eval(), DecoderStep(model, "gen").eval()
    got = greedy_decode(
        lambda *x: (encoder(*x),),
        lambda *x: tuple(step(*x).values()),
        input_ids,
        padding_mask,
        step.empty_cache(8),
    )
    assert torch.equal(got, expected)


def runner(path, input_names):
    """The written graph as a function of tensors returning its outputs in order (pt2 or ONNX Runtime)."""
    if path.suffix == ".pt2":
        return torch.export.load(path).module()
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = [i.name for i in session.get_inputs()]  # the exporter drops inputs a graph does not read

    def run(*inputs):
        named = dict(zip(input_names, inputs))
        outputs = session.run(None, {name: named[name].numpy() for name in feeds})
        return [torch.from_numpy(output) for output in outputs]

    return run


@pytest.mark.parametrize("format", ["pt2", "onnx"])
def test_exported_graphs_match_eager_and_decode_like_generate(module, format, tmp_path):
    entries = {entry["graph"]: entry for entry in export_model(module, tmp_path, format)}
    assert list(entries) == ["cls", "gen_encoder", "gen_decoder_step"]
    for entry in entries.values():  # export_model checked each on two batch sizes; here the numbers
        assert max(entry["max_abs_difference"].values()) <= 1e-4, entry["graph"]

    # a third batch, of sizes neither graph was traced or checked with
    input_ids, padding_mask = token_batch(VOCAB, 6, 9, seed=3)
    expected = module.generate("gen", input_ids, padding_mask)
    assert expected.shape[1] == CAPACITY and (expected == EOS_ID).any()  # rows that end, rows that run on
    encoder, step = (
        runner(tmp_path / entries[name]["file"], [i["name"] for i in entries[name]["inputs"]])
        for name in ("gen_encoder", "gen_decoder_step")
    )
    cache = DecoderStep(module.model, "gen").empty_cache(6)
    assert torch.equal(greedy_decode(encoder, step, input_ids, padding_mask, cache), expected)

    classify = runner(tmp_path / entries["cls"]["file"], ["input_ids", "padding_mask"])
    logits = torch.as_tensor(classify(input_ids, padding_mask)[0])
    torch.testing.assert_close(logits, module(input_ids, padding_mask, "cls"), rtol=0, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("format", ["pt2", "onnx"])
def test_every_task_type_exports(tasks, format, tmp_path):
    """Sequence and token classification, regression, generation (about a minute per format)."""
    torch.manual_seed(0)
    module = MultitaskModule(VOCAB, tasks, model_name="multitask_tiny").eval()
    entries = export_model(module, tmp_path, format)
    assert [entry["graph"] for entry in entries] == ["cls", "tag", "reg", "gen_encoder", "gen_decoder_step"]
    assert all(max(entry["max_abs_difference"].values()) <= 1e-4 for entry in entries)


@pytest.mark.slow
@pytest.mark.parametrize("format", ["pt2", "onnx"])
def test_zoo_export_of_the_arithmetic_config_decodes_like_generate(format, tmp_path):
    """The command on the real config (untrained: its seed fixes the weights), then the test split's
    expressions decoded with the written files."""
    from zoo.export import main
    from zoo.inference import load_trained_model

    config = ["--config", str(Path(__file__).parents[2] / "configs" / "multitask" / "arithmetic.yaml")]
    main([*config, "--format", format, "--output", str(tmp_path)])
    manifest = json.loads((tmp_path / "export.json").read_text())
    entries = {entry["graph"]: entry for entry in manifest["graphs"]}
    assert list(entries) == ["wellformed", "roles", "value_encoder", "value_decoder_step"]
    assert all(max(entry["max_abs_difference"].values()) <= 1e-4 for entry in entries.values())

    trained = load_trained_model([*config, "--data.init_args.test_size=64"], None)
    batch = next(iter(trained.datamodule.predict_dataloader()))
    input_ids, padding_mask = batch["input_ids"], batch["padding_mask"]
    encoder, step = (
        runner(tmp_path / entries[name]["file"], [i["name"] for i in entries[name]["inputs"]])
        for name in ("value_encoder", "value_decoder_step")
    )
    cache = DecoderStep(trained.module.model, "value").empty_cache(input_ids.shape[0])
    expected = trained.module.generate("value", input_ids, padding_mask)
    assert torch.equal(greedy_decode(encoder, step, input_ids, padding_mask, cache), expected)
    roles = runner(tmp_path / entries["roles"]["file"], ["input_ids", "padding_mask"])
    torch.testing.assert_close(
        torch.as_tensor(roles(input_ids, padding_mask)[0]),
        trained.module(input_ids, padding_mask, "roles"),
        rtol=0,
        atol=1e-4,
    )
