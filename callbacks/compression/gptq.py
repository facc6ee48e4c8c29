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

torchao's int4 weight-only configs need CUDA (tinygemm) or a specific CPU packing with its C++ kernels; the
result here is a portable :class:`Int4Linear`: packed 4-bit codes (two per byte), float16 scales and uint8
zero points, dequantized in ``forward``. It cuts weight storage about 7x (group 64); on CPU it is a size win,
not a speed win.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.callbacks.compression.records import add_record, register_replay

__all__ = ["Int4Linear", "gptq_quantize", "quantize_int4_gptq", "rtn_quantize"]

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


def _replace(module: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attribute = name.rpartition(".")
    setattr(module.get_submodule(parent_name) if parent_name else module, attribute, new)


def collect_hessians(module: nn.Module, names: list[str], inputs: list[Any]) -> dict[str, Tensor]:
    """``H = 2 X^T X / n`` of each named Linear's inputs over calibration ``inputs`` (one float forward pass)."""
    hessians: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    handles = []

    def hook(name: str):
        def fn(layer: nn.Module, args: tuple, output: Tensor) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            n = counts.get(name, 0)
            h = hessians.get(name)
            h = torch.zeros(x.shape[1], x.shape[1], device=x.device) if h is None else h * (n / (n + len(x)))
            counts[name] = n + len(x)
            hessians[name] = h + (2 / counts[name]) * x.t() @ x

        return fn

    for name in names:
        handles.append(module.get_submodule(name).register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            for x in inputs:
                module(x)
    finally:
        for handle in handles:
            handle.remove()
    return hessians


def quantize_int4_gptq(
    module: nn.Module,
    inputs: list[Any],
    group_size: int | None = 64,
    skip: tuple[str, ...] = (),
    percdamp: float = 0.01,
) -> dict:
    """Replace every ``nn.Linear`` (not under ``skip``) by an :class:`Int4Linear` calibrated with GPTQ; in place."""
    names = [
        n
        for n, m in module.named_modules()
        if type(m) is nn.Linear and not any(n == s or n.startswith(s + ".") for s in skip)
    ]
    if not names:
        raise ValueError("GPTQ found no nn.Linear layer to quantize")
    hessians = collect_hessians(module, names, inputs)
    for name in names:
        linear = module.get_submodule(name)
        if name not in hessians:
            raise RuntimeError(
                f"layer {name!r} saw no calibration input; GPTQ needs every quantized layer to run"
            )
        codes, scales, zeros = gptq_quantize(linear.weight, hessians[name], group_size, percdamp=percdamp)
        _replace(module, name, Int4Linear.from_codes(linear, codes, scales, zeros, group_size))
    record = {"kind": "int4_gptq", "group_size": group_size, "layers": names}
    add_record(module, record)
    return record


@register_replay("int4_gptq")
def _replay_int4(module: nn.Module, record: dict) -> None:
    for name in record["layers"]:
        linear = module.get_submodule(name)
        _replace(
            module,
            name,
            Int4Linear(
                linear.in_features, linear.out_features, linear.bias is not None, record["group_size"]
            ),
        )
