"""The ``torch.ao.quantization`` int8 path the zoo used before torchao: kept to load the checkpoints it wrote.

Checkpoints quantized before the move to torchao carry records that name ``torch.ao`` modules: dynamic int8
``{"kind": "int8_dynamic", "backend": "torch.ao"}``, and static int8 and QAT records without a ``backend``
key (``int8_static``, ``int8_prepare``, ``int8_convert``), whose state dicts hold packed fbgemm weights,
quantized tensors and observer statistics. Replaying those records here rebuilds the same ``torch.ao``
modules, so such a checkpoint loads and computes exactly what it did (the int8 kernels are the same).
Converting them to torchao tensors instead would change their numerics (``torch.ao`` quantizes activations
per tensor to 7-bit unsigned, torchao per token to signed 8-bit), so they are not converted.

``torch.ao.quantization`` is deprecated ("will be removed") but still ships with torch 2.14.1; its
deprecation warnings are silenced here. ``quantize_dynamic_int8(backend="torch.ao")`` still writes this
format, for side-by-side comparisons (``benchmarks/compression.py``); new checkpoints use torchao.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["QuantWrapper", "convert", "prepare", "quantize_dynamic"]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence ``torch.ao.quantization``'s deprecation warnings (expected: this module exists for old files)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.ao")
        warnings.filterwarnings("ignore", message=".*must run observer before calling calculate_qparams.*")
        yield


def _torch_ao():
    try:
        import torch.ao.quantization as ao
    except ImportError as error:  # removed from a future torch
        raise RuntimeError(
            "this checkpoint was quantized with torch.ao.quantization, which this torch no longer has; load "
            "it with torch <= 2.14 and quantize the float checkpoint again (torchao)"
        ) from error
    return ao


def quantize_dynamic(module: nn.Module, layers: list[str]) -> None:
    """``torch.ao`` dynamic int8 (fbgemm kernels, 7-bit per-tensor activations) of the named Linears; in place."""
    ao = _torch_ao()
    with quiet():
        ao.quantize_dynamic(
            module, dict.fromkeys(layers, ao.default_dynamic_qconfig), dtype=torch.qint8, inplace=True
        )


class QuantWrapper(nn.Module):
    """``quant -> layer -> dequant``: one layer computed in int8 inside a float model."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        ao = _torch_ao()
        self.quant, self.layer, self.dequant = ao.QuantStub(), layer, ao.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if isinstance(self.layer, nn.Linear) and x.ndim > 2:  # quantized Linear takes 2-D input
            return self.dequant(self.layer(self.quant(x.reshape(-1, shape[-1])))).reshape(*shape[:-1], -1)
        return self.dequant(self.layer(self.quant(x)))


def prepare(module: nn.Module, record: dict) -> None:
    """Wrap the record's layers and insert observers (``qat``: fake-quantization modules); in place."""
    ao = _torch_ao()
    with quiet():
        torch.backends.quantized.engine = record["engine"]
        for name in record["layers"]:
            parent_name, _, attribute = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, attribute, QuantWrapper(getattr(parent, attribute)))
        qconfig = (ao.get_default_qat_qconfig if record["qat"] else ao.get_default_qconfig)(record["engine"])
        for name in record["layers"]:
            module.get_submodule(name).qconfig = qconfig
        was_training = module.training
        if record["qat"]:
            module.train()
            ao.prepare_qat(module, inplace=True)
        else:
            ao.prepare(module, inplace=True)
        module.train(was_training)


def convert(module: nn.Module) -> None:
    """Observers / fake-quantization -> ``torch.ao`` int8 modules; in place."""
    ao = _torch_ao()
    with quiet():
        was_training = module.training
        module.eval()
        ao.convert(module, inplace=True)
        module.train(was_training)
