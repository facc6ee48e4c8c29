"""Int8 quantization: post-training dynamic, static (calibrated) and quantization-aware training.

Which library, and why (measured on this x86 CPU, torch 2.14.1, torchao 0.18.0, DeiT-Ti at batch 32):

- torchao's ``quantize_(model, Int8DynamicActivationInt8WeightConfig())`` runs on CPU and is accurate, but in
  eager mode it is *no faster* than float32 (0.30 s vs 0.30 s per batch: its int8 matmuls are fast only under
  ``torch.compile``/inductor or on CUDA). ``torch.ao.quantization.quantize_dynamic`` uses the fbgemm/x86 int8
  GEMM kernels and ran the same model 2x faster. So ``backend="auto"`` uses torchao on CUDA and
  ``torch.ao.quantization`` on CPU; ``backend`` picks one explicitly.
- Static int8 and QAT use ``torch.ao.quantization`` eager mode (observers -> ``convert``; ``prepare_qat``
  fake-quant modules), the stack whose converted modules run with CPU int8 kernels and save as a plain state
  dict. torchao's replacements (pt2e ``prepare_pt2e``/``convert_pt2e``) need a ``torch.export`` graph of the
  whole model, which Lightning modules with metric collections and data-dependent code paths do not give.
  ``torch.ao.quantization`` is deprecated in favour of torchao but still ships with torch 2.14.1; its
  deprecation warnings are expected.

Each quantizable layer (``nn.Linear``; ``nn.Conv2d`` too for static/QAT) is wrapped as
``QuantStub -> layer -> DeQuantStub``, so only the layers run in int8 and everything between them (LayerNorm,
softmax, GELU, attention) stays float: this works for any model without rewriting its forward. Quantized
modules are inference-only; the checkpoint records let ``zoo validate --ckpt_path`` rebuild them. The int8 CPU
kernels have no deterministic implementation: evaluate them with ``Trainer(deterministic=False)``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from zoo.callbacks.compression.calibration import batch_inputs, calibration_batches
from zoo.callbacks.compression.records import (
    add_record,
    install_restore_hook,
    records_of,
    register_replay,
    save_records,
)
from zoo.extras import require

__all__ = ["QuantWrapper", "Quantization", "convert_static", "prepare_static", "quantize_dynamic_int8"]

Backend = Literal["auto", "torch.ao", "torchao"]
Mode = Literal["dynamic", "static", "qat", "int4_gptq"]


def _quiet() -> warnings.catch_warnings:
    manager = warnings.catch_warnings()
    manager.__enter__()
    warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.ao")
    warnings.filterwarnings("ignore", message=".*must run observer before calling calculate_qparams.*")
    return manager


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    return any(name == s or name.startswith(s + ".") for s in skip)


def _resolve_backend(backend: Backend, module: nn.Module) -> str:
    if backend not in ("auto", "torch.ao", "torchao"):
        raise ValueError(f"quantization backend must be 'auto', 'torch.ao' or 'torchao', got {backend!r}")
    if backend != "auto":
        return backend
    device = next(module.parameters()).device
    return "torchao" if device.type == "cuda" else "torch.ao"


def quantize_dynamic_int8(module: nn.Module, backend: Backend = "auto", skip: tuple[str, ...] = ()) -> dict:
    """Int8 weights, per-batch int8 activations for every ``nn.Linear`` not under ``skip``; in place."""
    names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and not _skipped(n, skip)]
    if not names:
        raise ValueError("dynamic quantization found no nn.Linear layer to quantize")
    backend = _resolve_backend(backend, module)
    record = {"kind": "int8_dynamic", "backend": backend, "layers": names}
    _apply_dynamic(module, record)
    add_record(module, record)
    return record


def _apply_dynamic(module: nn.Module, record: dict) -> None:
    layers = set(record["layers"])
    if record["backend"] == "torchao":
        torchao = require("torchao.quantization", "compression", "int8 quantization on CUDA (torchao)")
        config = torchao.Int8DynamicActivationInt8WeightConfig()
        torchao.quantize_(module, config, filter_fn=lambda m, fqn: fqn in layers)
        return
    manager = _quiet()
    try:
        from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

        quantize_dynamic(
            module, {n: default_dynamic_qconfig for n in layers}, dtype=torch.qint8, inplace=True
        )
    finally:
        manager.__exit__(None, None, None)


@register_replay("int8_dynamic")
def _replay_dynamic(module: nn.Module, record: dict) -> None:
    _apply_dynamic(module, record)


# --------------------------------------------------------------------------------- static and QAT
class QuantWrapper(nn.Module):
    """``quant -> layer -> dequant``: one layer computed in int8 inside a float model."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        from torch.ao.quantization import DeQuantStub, QuantStub

        self.quant, self.layer, self.dequant = QuantStub(), layer, DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if isinstance(self.layer, nn.Linear) and x.ndim > 2:  # quantized Linear takes 2-D input
            return self.dequant(self.layer(self.quant(x.reshape(-1, shape[-1])))).reshape(*shape[:-1], -1)
        return self.dequant(self.layer(self.quant(x)))


def _wrap(module: nn.Module, names: list[str]) -> None:
    for name in names:
        parent_name, _, attribute = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attribute, QuantWrapper(getattr(parent, attribute)))


def _quantizable(module: nn.Module, skip: tuple[str, ...]) -> list[str]:
    return [
        n
        for n, m in module.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
        and type(m) in (nn.Linear, nn.Conv2d)
        and not _skipped(n, skip)
    ]


def prepare_static(
    module: nn.Module, qat: bool = False, skip: tuple[str, ...] = (), engine: str = "x86"
) -> dict:
    """Wrap every Linear/Conv2d and insert observers (``qat``: fake-quantization modules); in place.

    QAT's prepared model is trained and checkpointed, so its preparation is recorded (``int8_prepare``);
    post-training preparation is not (calibration and :func:`convert_static` follow at once).
    """
    names = _quantizable(module, skip)
    if not names:
        raise ValueError("static quantization found no nn.Linear / nn.Conv2d layer to quantize")
    record = {"kind": "int8_prepare", "qat": qat, "engine": engine, "layers": names}
    _prepare(module, record)
    if qat:
        add_record(module, record)
    return record


def _prepare(module: nn.Module, record: dict) -> None:
    from torch.ao.quantization import get_default_qat_qconfig, get_default_qconfig, prepare, prepare_qat

    manager = _quiet()
    try:
        torch.backends.quantized.engine = record["engine"]
        _wrap(module, record["layers"])
        qconfig = (get_default_qat_qconfig if record["qat"] else get_default_qconfig)(record["engine"])
        for name in record["layers"]:
            module.get_submodule(name).qconfig = qconfig
        if record["qat"]:
            was_training = module.training
            module.train()
            prepare_qat(module, inplace=True)
            module.train(was_training)
        else:
            prepare(module, inplace=True)
    finally:
        manager.__exit__(None, None, None)


def _convert(module: nn.Module) -> None:
    from torch.ao.quantization import convert

    manager = _quiet()
    try:
        was_training = module.training
        module.eval()
        convert(module, inplace=True)
        module.train(was_training)
    finally:
        manager.__exit__(None, None, None)


def convert_static(module: nn.Module, prepared: dict) -> None:
    """Observers/fake-quant -> int8 modules (after calibration or QAT), in place; records the change."""
    _convert(module)
    if prepared["qat"]:
        add_record(module, {"kind": "int8_convert"})
    else:
        add_record(module, {**prepared, "kind": "int8_static"})


@register_replay("int8_prepare")
def _replay_prepare(module: nn.Module, record: dict) -> None:
    _prepare(module, record)


@register_replay("int8_convert")
def _replay_convert(module: nn.Module, record: dict) -> None:
    _convert(module)


@register_replay("int8_static")
def _replay_static(module: nn.Module, record: dict) -> None:
    _prepare(module, record)  # uncalibrated observers: the state dict brings the scales and zero points
    _convert(module)


# --------------------------------------------------------------------------------------- the callback
#: Records of a model already quantized (that ``Quantization`` leaves as it is).
QUANTIZED_KINDS = frozenset({"int8_dynamic", "int8_static", "int8_convert", "int4_gptq"})


class Quantization(Callback):
    """Quantize the model at the end of ``fit`` (or in ``validate``/``test`` for a float checkpoint).

    Modes:
        - ``dynamic``: int8 weights and per-batch int8 activations for ``nn.Linear`` (no data needed).
        - ``static``: int8 weights and activations with scales calibrated over ``calibration_batches``
          validation batches (observers, then ``convert``).
        - ``qat``: fake-quantization modules inserted in ``setup("fit")`` (before the optimizer is built),
          trained through, converted to int8 at the end of fit.
        - ``int4_gptq``: 4-bit weight-only ``nn.Linear`` with GPTQ calibration over validation batches
          (:mod:`zoo.callbacks.compression.gptq`).

    The quantized model is saved to ``save_path`` (relative paths go under the trainer's log directory) with
    the compression records, so ``zoo validate --config <same config> --ckpt_path <save_path>`` evaluates it.
    ``on_validation=True`` quantizes a float model at the start of ``validate``/``test`` instead (post-training
    quantization of an existing checkpoint). The fit's other checkpoints stay float (resumable).

    Args:
        mode: see above. backend: ``auto``/``torch.ao``/``torchao`` (dynamic mode only; see module docstring).
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
        _resolve_backend(backend, nn.Linear(1, 1))
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
            prepare_static(pl_module, qat=True, skip=self.skip)

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
            if _resolve_backend(self.backend, pl_module) == "torch.ao":
                pl_module.cpu()  # its int8 kernels are CPU kernels
            quantize_dynamic_int8(pl_module, self.backend, self.skip)
            return
        if self.mode == "qat":
            prepared = [r for r in records_of(pl_module) if r["kind"] == "int8_prepare"]
            if not prepared:
                raise RuntimeError("QAT converts a model prepared in setup('fit'); this one was not prepared")
            pl_module.cpu()
            convert_static(pl_module, prepared[-1])
            return
        batches = calibration_batches(trainer, pl_module, "val", self.calibration_batches)
        inputs = [batch_inputs(b, self.input_key) for b in batches]
        if self.mode == "int4_gptq":
            from zoo.callbacks.compression.gptq import quantize_int4_gptq

            quantize_int4_gptq(pl_module, inputs, group_size=self.group_size, skip=self.skip)
            return
        pl_module.cpu()
        record = prepare_static(pl_module, qat=False, skip=self.skip)
        with torch.no_grad():
            for x in inputs:
                pl_module(x.cpu())
        convert_static(pl_module, record)

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        save_records(pl_module, checkpoint)


def _kinds(module: nn.Module) -> set[str]:
    return {r["kind"] for r in records_of(module)}
