"""Int8 (dynamic, static, QAT) and GPTQ int4: outputs within stated tolerances, exact save/reload.

Tolerances are relative to the float model's logits (random weights, 2 blocks): int8 keeps the largest
logit error under 25% of the logits' standard deviation, int4 under 50%.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from zoo.callbacks.compression import (
    Int4Linear,
    Quantization,
    gptq_quantize,
    quantize_dynamic_int8,
    quantize_int4_gptq,
    rtn_quantize,
    state_dict_bytes,
)
from zoo.callbacks.compression.gptq import collect_hessians, dequantize
from zoo.callbacks.compression.quantization import convert_static, prepare_static
from zoo.datamodules import ImageClassificationDataModule
from zoo.vision import ImageClassifier

from .helpers import NARROW, TINY_DEIT, images, round_trip, tiny_deit

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
    out = model(x)
    assert _max_error(out, reference) < 0.25
    assert state_dict_bytes(model) < 0.4 * float_bytes
    torch.testing.assert_close(round_trip(model, tiny_deit(seed=3))(x), out, atol=0, rtol=0)


def test_dynamic_int8_skips_named_layers():
    model = tiny_deit()
    record = quantize_dynamic_int8(model, skip=("model.head",))
    assert "model.head" not in record["layers"] and type(model.model.head) is nn.Linear


def test_static_int8_calibrates_and_reloads():
    model, x = tiny_deit(), images()
    reference = model(x)
    prepared = prepare_static(model)
    with torch.no_grad():
        model(x)  # calibration: observers record activation ranges
    convert_static(model, prepared)
    assert type(model.model.blocks[0].mlp.fc1.layer).__module__.startswith("torch.ao.nn.quantized")
    out = model(x)
    assert _max_error(out, reference) < 0.25
    torch.testing.assert_close(round_trip(model, tiny_deit(seed=3))(x), out, atol=0, rtol=0)


def _data() -> ImageClassificationDataModule:
    return ImageClassificationDataModule(train_size=32, val_size=16, test_size=16, batch_size=16)


def test_qat_trains_fake_quantized_then_saves_an_int8_model_that_validates(tmp_path, make_trainer):
    data, model = _data(), ImageClassifier(**TINY_DEIT)
    callback = Quantization(mode="qat", save_path=str(tmp_path / "qat.ckpt"))
    trainer = make_trainer(callbacks=[callback], max_steps=1, limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    assert callback.saved_to == tmp_path / "qat.ckpt"
    assert type(model.model.blocks[0].attn.qkv.layer).__module__.startswith("torch.ao.nn.quantized")
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
    assert type(model.model.head.layer).__module__.startswith("torch.ao.nn.quantized")


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


def test_gptq_model_stays_close_and_reloads():
    model, x = tiny_deit(**NARROW), images(16)
    reference = model(x)
    record = quantize_int4_gptq(model, [x], group_size=32)
    assert isinstance(model.model.blocks[0].mlp.fc2, Int4Linear) and "model.head" in record["layers"]
    out = model(x)
    assert _max_error(out, reference) < 0.5
    linear_bytes = 4 * sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, Int4Linear)
    )
    int4_bytes = sum(
        b.numel() * b.element_size()
        for m in model.modules()
        if isinstance(m, Int4Linear)
        for b in m.buffers()
    )
    assert int4_bytes < 0.2 * linear_bytes  # 4-bit codes + a float16 scale and uint8 zero per 32 weights
    torch.testing.assert_close(round_trip(model, tiny_deit(seed=3, **NARROW))(x), out, atol=0, rtol=0)


def test_gptq_through_the_callback_at_fit_end(tmp_path, make_trainer):
    data, model = _data(), ImageClassifier(**{**TINY_DEIT, "model_kwargs": NARROW})
    callback = Quantization(mode="int4_gptq", calibration_batches=1, save_path=None)
    make_trainer(callbacks=[callback], max_steps=1, limit_val_batches=1).fit(model, datamodule=data)
    assert isinstance(model.model.blocks[0].attn.proj, Int4Linear)


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
