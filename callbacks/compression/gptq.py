"""4-bit weight-only quantization of ``nn.Linear`` with GPTQ calibration (Frantar et al., 2022), written here.

Round-to-nearest (RTN) quantizes every weight on its own. GPTQ quantizes a layer's input columns one at a time
and spreads each column's rounding error over the columns not yet quantized, weighted by the inverse Hessian
of the layer's reconstruction loss ``||X W^T - X Q^T||^2``, ``H = 2 X^T X / n`` from calibration inputs:

1. ``H`` is accumulated from the inputs every Linear sees on calibration batches (forward hooks, one pass of
   the float model; the reference code goes block by block on the already-quantized model instead); dead
   inputs (zero diagonal) are fixed, ``H`` is dampened by ``percdamp * mean(diag H)``.
2. ``U = cholesky(H^-1)^T`` (upper) gives, row by row, the inverse-Hessian terms of the remaining columns.
3. Columns are processed in blocks of ``block_size`` ("lazy batch" updates): within a block each column is
   quantized on its group's asymmetric 4-bit grid (scale and zero point per output row and ``group_size``
   columns, fixed when the group's first column is reached, as in the reference), the error
   ``(w - q) / U[i, i]`` updates the block's remaining columns, and the block's errors update all later
   columns at once.

Storage: torchao's ``Int4Tensor`` (plain packing: two signed 4-bit values per byte, per-group bfloat16 scales
and zero points, ``w = q * scale + zero``, the layout of its int4 GPU kernels), built from GPTQ's own codes
(not re-quantized: ``q = code - 8`` and ``zero = (8 - zero_point) * scale`` give the same grid) and held by
:class:`TorchaoInt4Linear`. That tensor's matmul is a CUDA kernel of the ``mslk`` package (bfloat16
activations); torchao 0.18 has no int4 weight-only CPU kernel: its other int4 layouts are CUDA-only too
(tinygemm's tile packing, whose packing op itself runs on CUDA only) or XPU/NPU ones. So on CPU (or without
``mslk``) the layer dequantizes its weight and runs a float matmul: a size win, not a speed win (about 6x
smaller weights at group 64). The kernel path is not exercised by this repository's CPU tests.

Checkpoints written before this storage (records without ``"format"``) hold :class:`Int4Linear` buffers
(4-bit codes, float16 scales, uint8 zero points) and still load into that class.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.callbacks.compression.calibration import run_with_layer_hooks
from zoo.callbacks.compression.records import add_record, register_replay

__all__ = [
    "Int4Linear",
    "TorchaoInt4Linear",
    "gptq_quantize",
    "int4_tensor",
    "quantize_int4_gptq",
    "rtn_quantize",
]

BITS = 4
LEVELS = 2**BITS - 1


def _grid(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Asymmetric min-max grid per row of ``weight``: ``(scale, zero)``, both ``(rows, 1)``."""
    low = weight.min(dim=1, keepdim=True).values.clamp(max=0)
    high = weight.max(dim=1, keepdim=True).values.clamp(min=0)
    scale = (high - low) / LEVELS
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.round(-low / scale)
    return scale, zero


def _quantize(w: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, LEVELS)


def _groups(columns: int, group_size: int | None) -> int:
    return columns if group_size is None else group_size


def rtn_quantize(weight: Tensor, group_size: int | None = 64) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest on the same grid as GPTQ: ``(codes, scales, zeros)``; the baseline GPTQ must beat."""
    columns = weight.shape[1]
    g = _groups(columns, group_size)
    codes = torch.empty_like(weight)
    scales, zeros = [], []
    for start in range(0, columns, g):
        block = weight[:, start : start + g].float()
        scale, zero = _grid(block)
        codes[:, start : start + g] = _quantize(block, scale, zero)
        scales.append(scale)
        zeros.append(zero)
    return codes.to(torch.uint8), torch.cat(scales, 1), torch.cat(zeros, 1)


def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    group_size: int | None = 64,
    block_size: int = 128,
    percdamp: float = 0.01,
) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ for one ``(out, in)`` weight given ``H`` ``(in, in)``: ``(codes, scales, zeros)`` per group."""
    W = weight.detach().clone().float()
    H = hessian.detach().clone().float()
    rows, columns = W.shape
    g = _groups(columns, group_size)
    if group_size is not None and block_size % group_size:
        block_size = group_size * max(1, block_size // group_size)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += torch.eye(columns, device=H.device) * percdamp * torch.mean(torch.diag(H))
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros_like(W)
    scales = torch.zeros(rows, math.ceil(columns / g), device=W.device)
    zeros = torch.zeros_like(scales)
    scale = zero = None
    for b1 in range(0, columns, block_size):
        b2 = min(b1 + block_size, columns)
        W1, U1 = W[:, b1:b2].clone(), U[b1:b2, b1:b2]
        errors = torch.zeros_like(W1)
        for i in range(b2 - b1):
            column = b1 + i
            if column % g == 0:  # the group starts here: its grid from the (error-updated) weights
                scale, zero = _grid(W1[:, i : i + g] if i + g <= b2 - b1 else W[:, column : column + g])
                scales[:, column // g], zeros[:, column // g] = scale[:, 0], zero[:, 0]
            w = W1[:, i]
            q = _quantize(w[:, None], scale, zero)
            codes[:, column] = q[:, 0]
            error = (w - ((q - zero) * scale)[:, 0]) / U1[i, i]
            W1[:, i:] -= error[:, None] @ U1[i, i:][None, :]
            errors[:, i] = error
        W[:, b2:] -= errors @ U[b1:b2, b2:]
    return codes.to(torch.uint8), scales, zeros


def dequantize(codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int | None) -> Tensor:
    g = _groups(codes.shape[1], group_size)
    expand = lambda t: t.repeat_interleave(g, dim=1)[:, : codes.shape[1]]  # noqa: E731
    return (codes.float() - expand(zeros.float())) * expand(scales.float())


class Int4Linear(nn.Module):
    """A Linear whose weight is stored as packed 4-bit codes + per-group float16 scales and uint8 zero points."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int | None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = math.ceil(in_features / _groups(in_features, group_size))
        self.register_buffer(
            "packed", torch.zeros(out_features, math.ceil(in_features / 2), dtype=torch.uint8)
        )
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float16))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_codes(
        cls, linear: nn.Linear, codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int | None
    ):
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size)
        module.to(linear.weight.device)
        padded = F.pad(codes, (0, codes.shape[1] % 2))
        module.packed.copy_(padded[:, 0::2] | (padded[:, 1::2] << 4))
        module.scales.copy_(scales.to(torch.float16))
        module.zeros.copy_(zeros.to(torch.uint8))
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def codes(self) -> Tensor:
        low, high = self.packed & 0xF, self.packed >> 4
        return torch.stack([low, high], dim=2).flatten(1)[:, : self.in_features]

    def weight(self) -> Tensor:
        return dequantize(self.codes(), self.scales, self.zeros, self.group_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=4, group_size={self.group_size}"


def int4_tensor(codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int | None) -> Tensor:
    """GPTQ's ``(codes, scales, zeros)`` as torchao's ``Int4Tensor``: ``(code - zero) * scale`` becomes
    ``q * scale + zero'`` with signed ``q = code - 8`` and ``zero' = (8 - zero) * scale`` (bfloat16)."""
    from torchao.quantization import Int4Tensor

    rows, columns = codes.shape
    g = _groups(columns, group_size)
    if columns % 2 or columns % g:
        raise ValueError(
            f"torchao's int4 layout needs an even number of input features divisible by the group size; "
            f"this layer has {columns} (group {g}): skip it"
        )
    signed = codes.to(torch.int8) - 8
    packed = (signed[:, 0::2] & 0xF) | (signed[:, 1::2] << 4)
    zero_points = (8 - zeros.float()) * scales.float()
    return Int4Tensor(
        qdata=packed.contiguous(),
        scale=scales.float().t().contiguous().to(torch.bfloat16),
        zero_point=zero_points.t().contiguous().to(torch.bfloat16),
        block_size=[1, g],
        shape=torch.Size([rows, columns]),
        activation_dtype=torch.bfloat16,
    )


def dequantize_int4_tensor(weight: Tensor) -> Tensor:
    """``q * scale + zero`` of an ``Int4Tensor`` in float32 (what the layer computes with off the GPU kernel)."""
    low = (weight.qdata & 0xF).to(torch.int16)
    low = low - 16 * (low >= 8)  # sign of the low nibble
    high = (weight.qdata >> 4).to(torch.int16)  # arithmetic shift: already signed
    q = torch.stack([low, high], dim=2).flatten(1)
    g = weight.block_size[-1]
    scale = weight.scale.float().t().repeat_interleave(g, dim=1)
    zero = weight.zero_point.float().t().repeat_interleave(g, dim=1)
    return q.float() * scale + zero


def _gpu_kernel_available(x: Tensor) -> bool:
    import importlib.util

    return x.is_cuda and importlib.util.find_spec("mslk") is not None


class TorchaoInt4Linear(nn.Module):
    """A Linear whose weight is torchao's ``Int4Tensor`` (weight-only int4, per-group scales and zero points).

    On CUDA with ``mslk`` installed, ``F.linear`` dispatches to torchao's int4 kernel (bfloat16 activations);
    elsewhere the weight is dequantized to float32 for the call. Not an ``nn.Linear`` subclass, so int8
    quantization passes (``isinstance(m, nn.Linear)``) leave it alone.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        from zoo.callbacks.compression.quantization import plain_state_dict

        plain_state_dict(self)  # plain tensors in the state dict (Lightning's map_location)

    def forward(self, x: Tensor) -> Tensor:
        if _gpu_kernel_available(x):
            bias = None if self.bias is None else self.bias.to(torch.bfloat16)
            return F.linear(x.to(torch.bfloat16), self.weight, bias).to(x.dtype)
        return F.linear(x, dequantize_int4_tensor(self.weight).to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        g = self.weight.block_size[-1]
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=4, group_size={g}, torchao"


def _replace(module: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attribute = name.rpartition(".")
    setattr(module.get_submodule(parent_name) if parent_name else module, attribute, new)


def collect_hessians(module: nn.Module, names: list[str], inputs: list[Any]) -> dict[str, Tensor]:
    """``H = 2 X^T X / n`` of each named Linear's inputs over calibration ``inputs`` (one float forward pass)."""
    hessians: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def fn(layer: nn.Module, args: tuple, output: Tensor) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            n = counts.get(name, 0)
            h = hessians.get(name)
            h = torch.zeros(x.shape[1], x.shape[1], device=x.device) if h is None else h * (n / (n + len(x)))
            counts[name] = n + len(x)
            hessians[name] = h + (2 / counts[name]) * x.t() @ x

        return fn

    run_with_layer_hooks(module, names, hook, inputs)
    return hessians


def quantize_int4_gptq(
    module: nn.Module,
    inputs: list[Any],
    group_size: int | None = 64,
    skip: tuple[str, ...] = (),
    percdamp: float = 0.01,
) -> dict:
    """Replace every ``nn.Linear`` (not under ``skip``) by a :class:`TorchaoInt4Linear` calibrated with GPTQ;
    in place."""
    names = [
        n
        for n, m in module.named_modules()
        if type(m) is nn.Linear and not any(n == s or n.startswith(s + ".") for s in skip)
    ]
    if not names:
        raise ValueError("GPTQ found no nn.Linear layer to quantize")
    for name in names:  # before the calibration pass: a layer torchao's layout cannot hold fails at once
        linear = module.get_submodule(name)
        g = _groups(linear.in_features, group_size)
        if linear.in_features % 2 or linear.in_features % g:
            raise ValueError(
                f"layer {name!r} has {linear.in_features} input features, which torchao's int4 layout cannot "
                f"split into groups of {g} (and pairs): skip it or choose another group_size"
            )
    hessians = collect_hessians(module, names, inputs)
    for name in names:
        linear = module.get_submodule(name)
        if name not in hessians:
            raise RuntimeError(
                f"layer {name!r} saw no calibration input; GPTQ needs every quantized layer to run"
            )
        codes, scales, zeros = gptq_quantize(linear.weight, hessians[name], group_size, percdamp=percdamp)
        _replace(module, name, TorchaoInt4Linear(int4_tensor(codes, scales, zeros, group_size), linear.bias))
    record = {"kind": "int4_gptq", "format": "torchao", "group_size": group_size, "layers": names}
    add_record(module, record)
    return record


@register_replay("int4_gptq")
def _replay_int4(module: nn.Module, record: dict) -> None:
    """Placeholder int4 layers of the recorded shapes (the state dict brings the codes, scales and zeros):
    :class:`TorchaoInt4Linear`, or :class:`Int4Linear` for checkpoints written before (no ``"format"``)."""
    g = record["group_size"]
    for name in record["layers"]:
        linear = module.get_submodule(name)
        if record.get("format") == "torchao":
            shape = (linear.out_features, linear.in_features)
            groups = _groups(linear.in_features, g)
            placeholder = int4_tensor(
                torch.zeros(shape, dtype=torch.uint8),
                torch.ones(shape[0], linear.in_features // groups),
                torch.zeros(shape[0], linear.in_features // groups),
                g,
            )
            new = TorchaoInt4Linear(placeholder, linear.bias)
        else:
            new = Int4Linear(linear.in_features, linear.out_features, linear.bias is not None, g)
        _replace(module, name, new)
