"""Int8 quantization with torchao: post-training dynamic, static (calibrated) and quantization-aware training.

All three replace the weight of every ``nn.Linear`` (not under ``skip``) by a torchao ``Int8Tensor`` through
``torchao.quantization.quantize_`` (torchao 0.18), so the model keeps its modules and its forward:

- dynamic: ``Int8DynamicActivationInt8WeightConfig()``: int8 weights per output channel, activations quantized
  per token (symmetric int8) on every call. No data needed.
- static: ``Int8StaticActivationInt8WeightConfig`` with one activation scale per layer, calibrated here as the
  largest ``|x|`` the layer sees over the calibration batches (symmetric int8, per tensor; weights per channel).
- QAT: ``QATConfig(step="prepare")`` swaps Linears for ``FakeQuantizedLinear`` (int8 per-token asymmetric
  activations, int8 per-channel symmetric weights, fake-quantized in float so that training sees the rounding);
  ``QATConfig(Int8DynamicActivationInt8WeightConfig(act_mapping_type=ASYMMETRIC), step="convert")`` then gives
  the int8 model with the numerics it trained with. torchao 0.18's ``QATConfig`` cannot infer fake-quantization
  from an int8 base config (only int4, float8 and intx ones), so both halves are spelled out.

Only ``nn.Linear`` layers are quantized (torchao's int8 configs are for linear layers); convolutions stay float.

Speed on CPU: torchao's int8 matmul pays off under ``torch.compile`` (inductor fuses the activation
quantization, the int8 GEMM and the rescale): eager it is slower than float32, compiled faster than the old
``torch.ao`` fbgemm path (figures and command: README.md, Compression). Give the model family's
``compile: true`` for CPU inference. ``set_inductor_config=False``: torchao would otherwise change inductor's
process-wide settings (coordinate-descent tuning for GPU kernels) as a side effect of quantizing a model.

Quantized tensors are inference-only; the checkpoint records let ``zoo validate --ckpt_path`` rebuild them
(the state dict holds the ``Int8Tensor`` weights' plain tensors: :func:`plain_state_dict`). Checkpoints
written by the earlier ``torch.ao.quantization`` path load through :mod:`zoo.callbacks.compression.legacy`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from zoo.callbacks.compression import legacy
from zoo.callbacks.compression.calibration import batch_inputs, calibration_batches, run_with_layer_hooks
from zoo.callbacks.compression.records import (
    add_record,
    install_restore_hook,
    records_of,
    register_replay,
    save_records,
)
from zoo.extras import require

__all__ = [
    "Quantization",
    "convert_qat_int8",
    "plain_state_dict",
    "prepare_qat_int8",
    "quantize_dynamic_int8",
    "quantize_static_int8",
]

Backend = Literal["auto", "torch.ao", "torchao"]
Mode = Literal["dynamic", "static", "qat", "int4_gptq"]


def _torchao():
    return require("torchao.quantization", "compression", "int8 quantization (torchao)")


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    return any(name == s or name.startswith(s + ".") for s in skip)


def _linears(module: nn.Module, skip: tuple[str, ...]) -> list[str]:
    return [n for n, m in module.named_modules() if type(m) is nn.Linear and not _skipped(n, skip)]


def _named(layers: list[str]) -> Callable[[nn.Module, str], bool]:
    chosen = set(layers)
    return lambda module, fqn: fqn in chosen


def _resolve_backend(backend: Backend) -> str:
    if backend not in ("auto", "torch.ao", "torchao"):
        raise ValueError(f"quantization backend must be 'auto', 'torch.ao' or 'torchao', got {backend!r}")
    return "torchao" if backend == "auto" else backend


# ------------------------------------------------------------------------------------- storage
def plain_state_dict(module: nn.Module) -> None:
    """Make every layer of ``module`` whose ``weight`` is a torchao tensor save plain tensors; idempotent.

    A torchao weight (``Int8Tensor``, int4 tensors) pickles as a tensor subclass, and ``torch.load`` cannot
    rebuild one under a callable ``map_location``, which is what Lightning's checkpoint loading passes
    (``Trainer.validate(ckpt_path=...)`` would fail). So the state dict holds its inner tensors instead,
    ``weight_qdata``, ``weight_scale``, ... (``__tensor_flatten__``), and loading rebuilds the torchao weight
    from them and the layout of the replayed (already quantized) layer's own weight.
    """
    from torchao.utils import TorchAOBaseTensor

    for layer in module.modules():
        weight = getattr(layer, "weight", None)
        if isinstance(weight, TorchAOBaseTensor) and not getattr(layer, "_zoo_plain_state", False):
            layer.register_state_dict_post_hook(_flatten_weight)
            layer.register_load_state_dict_pre_hook(_unflatten_weight)
            layer._zoo_plain_state = True


def _flatten_weight(layer: nn.Module, state: dict, prefix: str, local_metadata: dict) -> None:
    weight = state.pop(prefix + "weight")
    for name in weight.__tensor_flatten__()[0]:
        state[f"{prefix}weight_{name}"] = getattr(weight, name)


def _unflatten_weight(layer: nn.Module, state: dict, prefix: str, *args: Any) -> None:
    current = layer.weight
    names, attributes = current.__tensor_flatten__()
    if prefix + "weight" in state or f"{prefix}weight_{names[0]}" not in state:
        return  # a whole weight, or none: load_state_dict reports it as usual
    inner = {name: state.pop(f"{prefix}weight_{name}") for name in names if f"{prefix}weight_{name}" in state}
    state[prefix + "weight"] = type(current).__tensor_unflatten__(inner, attributes, current.shape, None)


# --------------------------------------------------------------------------------------------- dynamic
def dynamic_config(asymmetric: bool = False):
    """torchao's dynamic int8 config (asymmetric activations: what QAT's fake quantization trains with)."""
    torchao = _torchao()
    mapping = torchao.MappingType.ASYMMETRIC if asymmetric else torchao.MappingType.SYMMETRIC
    return torchao.Int8DynamicActivationInt8WeightConfig(act_mapping_type=mapping, set_inductor_config=False)


def quantize_dynamic_int8(module: nn.Module, backend: Backend = "auto", skip: tuple[str, ...] = ()) -> dict:
    """Int8 weights, per-call int8 activations for every ``nn.Linear`` not under ``skip``; in place.

    ``backend="torch.ao"`` writes the pre-torchao format (:mod:`~zoo.callbacks.compression.legacy`), kept for
    comparisons; ``auto`` and ``torchao`` use torchao.
    """
    names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and not _skipped(n, skip)]
    if not names:
        raise ValueError("dynamic quantization found no nn.Linear layer to quantize")
    record = {"kind": "int8_dynamic", "backend": _resolve_backend(backend), "layers": names}
    _apply_dynamic(module, record)
    add_record(module, record)
    return record


def _apply_dynamic(module: nn.Module, record: dict) -> None:
    if record["backend"] == "torch.ao":
        legacy.quantize_dynamic(module, record["layers"])
    else:
        _torchao().quantize_(module, dynamic_config(), filter_fn=_named(record["layers"]))
        plain_state_dict(module)


@register_replay("int8_dynamic")
def _replay_dynamic(module: nn.Module, record: dict) -> None:
    _apply_dynamic(module, record)


# ---------------------------------------------------------------------------------------------- static
def calibrate_activation_ranges(
    module: nn.Module, layers: list[str], inputs: list[Any]
) -> dict[str, tuple[torch.Tensor, int]]:
    """Per layer: the largest ``|x|`` of its input over ``inputs`` and the input's number of dimensions."""
    ranges: dict[str, tuple[torch.Tensor, int]] = {}

    def hook(name: str):
        def fn(layer: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].detach()
            top, ndim = x.abs().amax().float(), x.ndim
            if name in ranges:
                if ranges[name][1] != ndim:
                    raise ValueError(
                        f"layer {name!r} saw {ranges[name][1]}-D and {ndim}-D inputs; static int8 keeps one "
                        "activation scale shaped for one input rank: skip it"
                    )
                top = torch.maximum(top, ranges[name][0])
            ranges[name] = (top, ndim)

        return fn

    run_with_layer_hooks(module, layers, hook, inputs)
    missing = [name for name in layers if name not in ranges]
    if missing:
        raise RuntimeError(f"layers {missing} saw no calibration input; static int8 needs every layer to run")
    return ranges


def _static_config(scale: torch.Tensor):
    torchao = _torchao()
    return torchao.Int8StaticActivationInt8WeightConfig(
        act_quant_scale=scale, granularity=[torchao.PerTensor(), torchao.PerRow()], set_inductor_config=False
    )


def quantize_static_int8(module: nn.Module, inputs: list[Any], skip: tuple[str, ...] = ()) -> dict:
    """Int8 weights and int8 activations with per-layer scales calibrated on ``inputs``; in place.

    The scale is ``max |x| / 127.5`` (torchao's symmetric int8 grid), shaped ``(1,) * ndim`` because torchao
    checks it against the activation's rank; the record keeps each rank so a replay can shape it again.
    """
    names = _linears(module, skip)
    if not names:
        raise ValueError("static quantization found no nn.Linear layer to quantize")
    ranges = calibrate_activation_ranges(module, names, inputs)
    eps = torch.finfo(torch.float32).eps
    for name in names:
        top, ndim = ranges[name]
        scale = (top / 127.5).clamp(min=eps).reshape((1,) * ndim)
        _torchao().quantize_(module, _static_config(scale), filter_fn=_named([name]))
    plain_state_dict(module)
    record = {
        "kind": "int8_static",
        "backend": "torchao",
        "layers": names,
        "input_dims": [ranges[name][1] for name in names],
    }
    add_record(module, record)
    return record


@register_replay("int8_static")
def _replay_static(module: nn.Module, record: dict) -> None:
    if record.get("backend") != "torchao":  # written by torch.ao (no backend key)
        legacy.prepare(module, record)  # uncalibrated observers: the state dict brings scales and zero points
        legacy.convert(module)
        return
    for name, ndim in zip(record["layers"], record["input_dims"], strict=True):
        placeholder = torch.ones((1,) * ndim)  # the state dict brings the calibrated scale
        _torchao().quantize_(module, _static_config(placeholder), filter_fn=_named([name]))
    plain_state_dict(module)


# ------------------------------------------------------------------------------------------------- QAT
def _qat_prepare_config():
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    return QATConfig(
        activation_config=IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
        weight_config=IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True),
        step="prepare",
    )


def prepare_qat_int8(module: nn.Module, skip: tuple[str, ...] = ()) -> dict:
    """Swap every ``nn.Linear`` (not under ``skip``) for torchao's ``FakeQuantizedLinear``; in place, recorded.

    The prepared model is trained and checkpointed (its state dict is the float one: the fake quantizers keep
    no state), so the preparation is recorded for a resumed fit or a validation of a QAT checkpoint.
    """
    names = _linears(module, skip)
    if not names:
        raise ValueError("quantization-aware training found no nn.Linear layer to quantize")
    record = {"kind": "int8_prepare", "backend": "torchao", "qat": True, "layers": names}
    _prepare_qat(module, record)
    add_record(module, record)
    return record


def _prepare_qat(module: nn.Module, record: dict) -> None:
    _torchao().quantize_(module, _qat_prepare_config(), filter_fn=_named(record["layers"]))


def convert_qat_int8(module: nn.Module) -> None:
    """Fake-quantized Linears -> int8 (dynamic, asymmetric activations as trained); in place, recorded."""
    _convert_qat(module)
    add_record(module, {"kind": "int8_convert", "backend": "torchao"})


def _convert_qat(module: nn.Module) -> None:
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

    config = QATConfig(dynamic_config(asymmetric=True), step="convert")
    _torchao().quantize_(module, config, filter_fn=lambda m, fqn: isinstance(m, FakeQuantizedLinear))
    plain_state_dict(module)


@register_replay("int8_prepare")
def _replay_prepare(module: nn.Module, record: dict) -> None:
    if record.get("backend") == "torchao":
        _prepare_qat(module, record)
    else:
        legacy.prepare(module, record)


@register_replay("int8_convert")
def _replay_convert(module: nn.Module, record: dict) -> None:
    if record.get("backend") == "torchao":
        _convert_qat(module)
    else:
        legacy.convert(module)


# --------------------------------------------------------------------------------------- the callback
#: Records of a model already quantized (that ``Quantization`` leaves as it is).
QUANTIZED_KINDS = frozenset({"int8_dynamic", "int8_static", "int8_convert", "int4_gptq"})


class Quantization(Callback):
    """Quantize the model at the end of ``fit`` (or in ``validate``/``test`` for a float checkpoint).

    Modes:
        - ``dynamic``: int8 weights and per-call int8 activations for ``nn.Linear`` (no data needed).
        - ``static``: int8 weights and activations with one scale per layer calibrated over
          ``calibration_batches`` validation batches.
        - ``qat``: torchao's fake-quantized Linears inserted in ``setup("fit")`` (before the optimizer is
          built), trained through, converted to int8 at the end of fit.
        - ``int4_gptq``: 4-bit weight-only ``nn.Linear`` with GPTQ calibration over validation batches
          (:mod:`zoo.callbacks.compression.gptq`).

    The quantized model is saved to ``save_path`` (relative paths go under the trainer's log directory) with
    the compression records, so ``zoo validate --config <same config> --ckpt_path <save_path>`` evaluates it.
    ``on_validation=True`` quantizes a float model at the start of ``validate``/``test`` instead (post-training
    quantization of an existing checkpoint). The fit's other checkpoints stay float (resumable).

    Args:
        mode: see above. backend: ``auto`` (= ``torchao``) or ``torch.ao`` (the deprecated pre-torchao path,
            dynamic mode only, kept for comparisons).
        skip: module-name prefixes kept in float (e.g. ``["model.head"]``).
        calibration_batches: validation batches for ``static`` / ``int4_gptq``.
        group_size: GPTQ column group size (``int4_gptq``).
        save_path: where the quantized checkpoint goes; ``None`` saves nothing.
        input_key: the batch entry holding the model input (dict batches).
    """

    def __init__(
        self,
        mode: Mode = "dynamic",
        backend: Backend = "auto",
        skip: list[str] | None = None,
        calibration_batches: int = 8,
        group_size: int = 64,
        save_path: str | None = "quantized.ckpt",
        on_validation: bool = False,
        input_key: str = "image",
    ) -> None:
        if mode not in ("dynamic", "static", "qat", "int4_gptq"):
            raise ValueError(f"quantization mode must be dynamic, static, qat or int4_gptq, got {mode!r}")
        _resolve_backend(backend)
        self.mode, self.backend, self.skip = mode, backend, tuple(skip or ())
        self.calibration_batches, self.group_size = calibration_batches, group_size
        self.save_path, self.on_validation, self.input_key = save_path, on_validation, input_key
        self.saved_to: Path | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        install_restore_hook(pl_module)
        # before the optimizer; a resumed fit replays it from the checkpoint's records. After another callback's
        # compression in setup (StructuredPruning's records), not only on a model no callback has touched.
        quantized = _kinds(pl_module) & {"int8_prepare", *QUANTIZED_KINDS}
        if self.mode == "qat" and stage == "fit" and trainer.ckpt_path is None and not quantized:
            prepare_qat_int8(pl_module, skip=self.skip)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._quantized(pl_module):
            return
        self.quantize(trainer, pl_module)
        if self.save_path is not None:
            path = Path(self.save_path)
            if not path.is_absolute():
                path = Path(trainer.log_dir or trainer.default_root_dir) / path
            trainer.save_checkpoint(path, weights_only=True)  # inference-only: no optimizer state
            self.saved_to = path

    def _start_evaluation(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.on_validation and not self._quantized(pl_module):
            self.quantize(trainer, pl_module)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._start_evaluation(trainer, pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start_evaluation(trainer, pl_module)

    @staticmethod
    def _quantized(pl_module: LightningModule) -> bool:
        return bool(_kinds(pl_module) & QUANTIZED_KINDS)

    def quantize(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pl_module.eval()
        if self.mode == "dynamic":
            if _resolve_backend(self.backend) == "torch.ao":
                pl_module.cpu()  # its int8 kernels are CPU kernels
            quantize_dynamic_int8(pl_module, self.backend, self.skip)
            return
        if self.mode == "qat":
            prepared = [r for r in records_of(pl_module) if r["kind"] == "int8_prepare"]
            if not prepared:
                raise RuntimeError("QAT converts a model prepared in setup('fit'); this one was not prepared")
            if prepared[-1].get("backend") == "torchao":
                convert_qat_int8(pl_module)
            else:  # a fit resumed from a checkpoint prepared by torch.ao: finish it in that format
                pl_module.cpu()
                legacy.convert(pl_module)
                add_record(pl_module, {"kind": "int8_convert"})
            return
        batches = calibration_batches(trainer, pl_module, "val", self.calibration_batches)
        inputs = [batch_inputs(b, self.input_key) for b in batches]
        if self.mode == "int4_gptq":
            from zoo.callbacks.compression.gptq import quantize_int4_gptq

            quantize_int4_gptq(pl_module, inputs, group_size=self.group_size, skip=self.skip)
            return
        quantize_static_int8(pl_module, inputs, skip=self.skip)

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        save_records(pl_module, checkpoint)


def _kinds(module: nn.Module) -> set[str]:
    return {r["kind"] for r in records_of(module)}
