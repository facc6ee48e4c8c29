"""Int8 (dynamic, static, QAT; torchao) and GPTQ int4: outputs within stated tolerances, exact save/reload,
and checkpoints of the earlier ``torch.ao`` path still loading with the outputs they had.

Tolerances are relative to the float model's logits (random weights, 2 blocks): int8 keeps the largest
logit error under 25% of the logits' standard deviation, int4 under 50%.

``legacy_torch_ao_int8.pt`` holds three checkpoints (dynamic, static and QAT int8 of
``tiny_deit(**NARROW)``) written by the ``torch.ao.quantization`` code before the move to torchao, with the
records, a batch of images and the logits that model gave (``images(4)``; static and QAT calibrated or
trained one step on ``images(8, seed=2)``).
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch
from torch import nn
from torchao.quantization import Int8Tensor
from torchao.quantization.qat import FakeQuantizedLinear

from zoo.callbacks.compression import (
    Int4Linear,
    Quantization,
    gptq_quantize,
    load_compressed,
    quantize_dynamic_int8,
    quantize_int4_gptq,
    quantize_static_int8,
    rtn_quantize,
    state_dict_bytes,
)
from zoo.callbacks.compression.gptq import (
    TorchaoInt4Linear,
    collect_hessians,
    dequantize,
    dequantize_int4_tensor,
    int4_tensor,
)
from zoo.callbacks.compression.quantization import convert_qat_int8, prepare_qat_int8
from zoo.callbacks.compression.records import records_of
from zoo.datamodules import ImageClassificationDataModule
from zoo.vision import ImageClassifier

from .helpers import NARROW, TINY_DEIT, images, round_trip, tiny_deit

LEGACY = Path(__file__).with_name("legacy_torch_ao_int8.pt")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


@pytest.fixture(autouse=True)
def nondeterministic():
    """Quantized CPU kernels have no deterministic variant; other tests' trainers may have asked for one."""
    enabled = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    yield
    torch.use_deterministic_algorithms(enabled)


def _max_error(quantized: torch.Tensor, reference: torch.Tensor) -> float:
    return ((quantized - reference).abs().max() / reference.std()).item()


@pytest.mark.parametrize("backend", ["torch.ao", "torchao"])
def test_dynamic_int8_stays_close_and_reloads(backend):
    model, x = tiny_deit(), images()
    reference = model(x)
    float_bytes = state_dict_bytes(model)
    quantize_dynamic_int8(model, backend=backend)
    fc1 = model.model.blocks[0].mlp.fc1
    if backend == "torchao":
        assert type(fc1) is nn.Linear and isinstance(fc1.weight, Int8Tensor)
    else:
        assert type(fc1).__module__.startswith("torch.ao.nn.quantized")
    out = model(x)
    assert _max_error(out, reference) < 0.25
    assert state_dict_bytes(model) < 0.4 * float_bytes
    torch.testing.assert_close(round_trip(model, tiny_deit(seed=3))(x), out, atol=0, rtol=0)


def test_torchao_weights_are_saved_as_plain_tensors_that_load_under_lightnings_map_location():
    """Lightning loads checkpoints with a callable ``map_location``, which cannot rebuild tensor subclasses."""
    model, x = tiny_deit(), images()
    quantize_dynamic_int8(model)
    state = model.state_dict()
    assert all(type(value) is torch.Tensor for value in state.values())
    assert state["model.blocks.0.mlp.fc1.weight_qdata"].dtype == torch.int8
    buffer = io.BytesIO()
    torch.save({"state_dict": state, "zoo_compression": records_of(model)}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, map_location=lambda storage, location: storage, weights_only=True)
    fresh = load_compressed(tiny_deit(seed=3), checkpoint)
    torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)


def test_dynamic_int8_skips_named_layers():
    model = tiny_deit()
    record = quantize_dynamic_int8(model, skip=("model.head",))
    assert "model.head" not in record["layers"] and type(model.model.head) is nn.Linear


def test_static_int8_calibrates_and_reloads():
    model, x = tiny_deit(), images()
    reference = model(x)
    record = quantize_static_int8(model, [x[:4], x[4:]])  # two calibration batches
    weight = model.model.blocks[0].mlp.fc1.weight
    assert isinstance(weight, Int8Tensor) and weight.act_quant_scale.shape == (1, 1, 1)
    # blocks see tokens (batch, tokens, features); the head the pooled (batch, features)
    assert record["input_dims"] == [3] * (len(record["layers"]) - 1) + [2]
    out = model(x)
    assert _max_error(out, reference) < 0.25
    torch.testing.assert_close(round_trip(model, tiny_deit(seed=3))(x), out, atol=0, rtol=0)


def test_static_int8_scale_is_the_largest_calibration_input_on_the_int8_grid():
    model = nn.Sequential(nn.Linear(4, 4))
    batches = [torch.randn(3, 4), 5 * torch.randn(3, 4)]
    quantize_static_int8(model, batches)
    largest = torch.cat(batches).abs().max()
    torch.testing.assert_close(model[0].weight.act_quant_scale, (largest / 127.5).reshape(1, 1))


def test_static_int8_refuses_a_layer_fed_inputs_of_two_ranks():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="saw 2-D and 3-D inputs"):
        quantize_static_int8(model, [torch.randn(2, 4), torch.randn(2, 3, 4)])


def test_qat_converts_to_int8_that_computes_what_training_fake_quantized():
    """The point of QAT: the converted int8 model's outputs are the fake-quantized ones it was trained on."""
    model, x = tiny_deit(), images()
    reference = model(x)
    prepare_qat_int8(model)
    assert type(model.model.blocks[0].mlp.fc1) is FakeQuantizedLinear
    fake_quantized = model(x)
    convert_qat_int8(model)
    assert type(model.model.blocks[0].mlp.fc1) is nn.Linear
    assert isinstance(model.model.blocks[0].mlp.fc1.weight, Int8Tensor)
    out = model(x)
    torch.testing.assert_close(out, fake_quantized, atol=1e-5 * reference.std().item(), rtol=0)
    assert _max_error(out, reference) < 0.25
    torch.testing.assert_close(round_trip(model, tiny_deit(seed=3))(x), out, atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["dynamic", "static", "qat"])
def test_checkpoints_quantized_by_torch_ao_before_torchao_still_load(mode):
    """Their records (no ``backend`` key for static and QAT) replay the ``torch.ao`` modules (legacy.py), so
    they load ``weights_only`` and compute what they computed when written (same fbgemm int8 kernels)."""
    checkpoint = torch.load(LEGACY, weights_only=True)[mode]
    kinds = [r["kind"] for r in checkpoint["zoo_compression"]]
    assert (
        kinds
        == {"dynamic": ["int8_dynamic"], "static": ["int8_static"], "qat": ["int8_prepare", "int8_convert"]}[
            mode
        ]
    )
    model = load_compressed(tiny_deit(seed=3, **NARROW), checkpoint).eval()
    assert type(model.model.blocks[0].mlp.fc1).__module__.startswith(
        "zoo.callbacks.compression.legacy" if mode != "dynamic" else "torch.ao.nn.quantized"
    )
    with torch.no_grad():
        torch.testing.assert_close(model(checkpoint["inputs"]), checkpoint["logits"], atol=1e-6, rtol=0)


def _data() -> ImageClassificationDataModule:
    return ImageClassificationDataModule(train_size=32, val_size=16, test_size=16, batch_size=16)


def test_qat_trains_fake_quantized_then_saves_an_int8_model_that_validates(tmp_path, make_trainer):
    data, model = _data(), ImageClassifier(**TINY_DEIT)
    callback = Quantization(mode="qat", save_path=str(tmp_path / "qat.ckpt"))
    trainer = make_trainer(callbacks=[callback], max_steps=1, limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    assert callback.saved_to == tmp_path / "qat.ckpt"
    assert isinstance(model.model.blocks[0].attn.qkv.weight, Int8Tensor)
    fresh = ImageClassifier(**TINY_DEIT)
    # quantized CPU kernels have no deterministic variant (the test trainer asks for determinism)
    validator = make_trainer(callbacks=[Quantization(mode="qat")], limit_val_batches=1, deterministic=False)
    (metrics,) = validator.validate(fresh, datamodule=data, ckpt_path=callback.saved_to)
    assert "val/acc" in metrics
    x = images(4)
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x), atol=0, rtol=0)


def test_post_training_quantization_of_a_float_checkpoint_in_validate(make_trainer):
    data, model = _data(), ImageClassifier(**TINY_DEIT)
    validator = make_trainer(
        callbacks=[Quantization(mode="static", on_validation=True, calibration_batches=1)],
        limit_val_batches=1,
        deterministic=False,
    )
    validator.validate(model, datamodule=data)
    assert (
        isinstance(model.model.head.weight, Int8Tensor)
        and model.model.head.weight.act_quant_scale is not None
    )


def test_int4_packing_is_lossless():
    linear = nn.Linear(7, 5)
    codes, scales, zeros = rtn_quantize(linear.weight, group_size=4)
    packed = Int4Linear.from_codes(linear, codes, scales, zeros, group_size=4)
    assert torch.equal(packed.codes(), codes)
    assert packed.packed.shape == (5, 4) and packed.packed.dtype == torch.uint8
    torch.testing.assert_close(packed.weight(), dequantize(codes, scales.half().float(), zeros, 4))


def test_gptq_reconstructs_calibration_outputs_better_than_round_to_nearest():
    """Frantar et al.'s claim on one layer: lower ``||X W^T - X Q^T||`` than RTN on the same 4-bit grid."""
    torch.manual_seed(0)
    layer = nn.Linear(128, 64)
    mixing = torch.randn(128, 128) / 4 + torch.eye(128)  # correlated inputs: where error compensation pays
    x = torch.randn(512, 128) @ mixing
    hessian = collect_hessians(nn.Sequential(layer), ["0"], [x])["0"]
    torch.testing.assert_close(hessian, 2 * x.t() @ x / len(x), rtol=1e-4, atol=1e-3)
    target = x @ layer.weight.detach().t()

    def error(codes, scales, zeros) -> float:
        weight = dequantize(codes, scales, zeros, 32)
        return (x @ weight.t() - target).pow(2).mean().item()

    gptq, rtn = (
        error(*gptq_quantize(layer.weight, hessian, group_size=32)),
        error(*rtn_quantize(layer.weight, 32)),
    )
    assert gptq < 0.7 * rtn


def test_int4_torchao_storage_keeps_gptqs_grid_and_computes_with_it_on_cpu():
    """Codes, scales and zero points -> ``Int4Tensor`` (signed codes, bfloat16 scale and zero): the same grid
    up to bfloat16 rounding of the scales, and the CPU forward is exactly the dequantized float matmul."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 24)
    codes, scales, zeros = rtn_quantize(linear.weight, group_size=16)
    weight = int4_tensor(codes, scales, zeros, 16)
    assert weight.qdata.shape == (24, 32) and weight.scale.shape == (4, 24)  # torchao's (groups, rows)
    reference = dequantize(codes, scales, zeros, 16)
    step = scales.repeat_interleave(16, dim=1)  # one quantization step of each weight
    error = (dequantize_int4_tensor(weight) - reference).abs()
    assert (
        error <= 2**-7 * 8 * step
    ).all()  # bfloat16 (8 bits) scale and zero on codes within 8 of the middle
    layer = TorchaoInt4Linear(weight, linear.bias)
    x = torch.randn(3, 5, 64)
    expected = torch.nn.functional.linear(x, dequantize_int4_tensor(weight), linear.bias)
    torch.testing.assert_close(layer(x), expected, atol=0, rtol=0)


def test_int4_checkpoints_written_before_the_torchao_storage_still_load():
    """Old records carry no ``format``: they rebuild ``Int4Linear`` and load its codes exactly."""
    model, x = tiny_deit(**NARROW), images(4)
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    for name in names:
        parent, _, attribute = name.rpartition(".")
        linear = model.get_submodule(name)
        codes, scales, zeros = rtn_quantize(linear.weight, group_size=32)
        setattr(
            model.get_submodule(parent), attribute, Int4Linear.from_codes(linear, codes, scales, zeros, 32)
        )
    records_of(model).append({"kind": "int4_gptq", "group_size": 32, "layers": names})
    out = model(x)
    fresh = round_trip(model, tiny_deit(seed=3, **NARROW))
    assert isinstance(fresh.model.blocks[0].mlp.fc1, Int4Linear)
    torch.testing.assert_close(fresh(x), out, atol=0, rtol=0)


def test_gptq_refuses_a_layer_torchaos_int4_layout_cannot_hold():
    with pytest.raises(ValueError, match="cannot split into groups of 32"):
        quantize_int4_gptq(nn.Sequential(nn.Linear(48, 8)), [torch.randn(4, 48)], group_size=32)


def test_gptq_model_stays_close_and_reloads():
    model, x = tiny_deit(**NARROW), images(16)
    reference = model(x)
    record = quantize_int4_gptq(model, [x], group_size=32)
    assert isinstance(model.model.blocks[0].mlp.fc2, TorchaoInt4Linear) and "model.head" in record["layers"]
    assert type(model.model.blocks[0].mlp.fc2.weight).__name__ == "Int4Tensor"
    out = model(x)
    assert _max_error(out, reference) < 0.5
    layers = [m for m in model.modules() if isinstance(m, TorchaoInt4Linear)]
    linear_bytes = 4 * sum(m.in_features * m.out_features for m in layers)
    state = model.state_dict()
    int4_bytes = sum(
        v.numel() * v.element_size() for k, v in state.items() if k.rsplit(".", 1)[-1].startswith("weight_")
    )
    assert int4_bytes < 0.2 * linear_bytes  # 4-bit codes + a bfloat16 scale and zero per 32 weights
    torch.testing.assert_close(round_trip(model, tiny_deit(seed=3, **NARROW))(x), out, atol=0, rtol=0)


def test_gptq_through_the_callback_at_fit_end(tmp_path, make_trainer):
    data, model = _data(), ImageClassifier(**{**TINY_DEIT, "model_kwargs": NARROW})
    callback = Quantization(mode="int4_gptq", calibration_batches=1, save_path=None)
    make_trainer(callbacks=[callback], max_steps=1, limit_val_batches=1).fit(model, datamodule=data)
    assert isinstance(model.model.blocks[0].attn.proj, TorchaoInt4Linear)


def test_bad_mode_is_rejected():
    with pytest.raises(ValueError, match="quantization mode"):
        Quantization(mode="int3")
    with pytest.raises(ValueError, match="backend"):
        quantize_dynamic_int8(copy.deepcopy(tiny_deit()), backend="onnx")


def test_zoo_inspect_compressed_loads_a_dynamic_int8_checkpoint(tmp_path, make_trainer, capsys):
    from zoo.commands import main

    data, model = _data(), ImageClassifier(**TINY_DEIT)
    callback = Quantization(mode="dynamic", save_path=str(tmp_path / "int8.ckpt"))
    make_trainer(callbacks=[callback], max_steps=1, limit_val_batches=0).fit(model, datamodule=data)
    main(["inspect-compressed", str(callback.saved_to), "--model", "ImageClassifier"])
    report = capsys.readouterr().out
    assert "int8.ckpt loads into ImageClassifier" in report and "dynamic" in report
