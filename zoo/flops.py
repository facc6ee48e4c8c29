"""Counting a step's floating-point operations, and the peak a device could do: the two halves of MFU.

``count_flops`` runs a function under ``torch.utils.flop_counter.FlopCounterMode``, which counts matrix
multiplications and convolutions (forward and backward) from the shapes that really run. Two kinds of work it
does not see are added here with formulas, so every family is counted:

- attention on CPU: PyTorch's CPU kernel (``_scaled_dot_product_flash_attention_for_cpu``) is missing from the
  counter's table (it counts 0), unlike the CUDA kernels; it gets the same formula as those;
- bilinear sampling (``grid_sampler_2d``, BEVFormer's deformable attention): 4 multiply-adds per output
  element and channel forward, twice that backward (gradients of the input and of the grid).

Elementwise work, norms and softmax are not counted, as in every published MFU figure.

``peak_flops(device, dtype)`` is Lightning's table of GPU peaks, completed for chips it does not name (an
"NVIDIA H200" reports no form factor and gets none from Lightning), or, on CPU, a measured matmul rate.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["count_flops", "measured_cpu_flops", "peak_flops"]

aten = torch.ops.aten


def _cpu_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _grid_sample(input_shape, grid_shape, *args, out_shape=None, **kwargs) -> int:
    batch, channels = input_shape[0], input_shape[1]
    return 8 * batch * channels * math.prod(grid_shape[1:-1])


def _grid_sample_backward(grad_shape, input_shape, grid_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _grid_sample(input_shape, grid_shape)


CUSTOM_FORMULAS: dict[Any, Callable[..., int]] = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
    aten.grid_sampler_2d: _grid_sample,
    aten.grid_sampler_2d_backward: _grid_sample_backward,
}


class _TotalsOnly:
    """Stands in for ``FlopCounterMode``'s module tracker, so everything counts under "Global" alone. The
    tracker hooks module inputs for backward, which fails under ``inference_mode`` (Lightning's evaluation) when
    a parameter is an input; the per-module breakdown it gives is not needed for a total."""

    parents = frozenset({"Global"})

    def __enter__(self) -> _TotalsOnly:
        return self

    def __exit__(self, *args: object) -> None:
        return None


def flop_counter() -> FlopCounterMode:
    """A quiet ``FlopCounterMode`` counting totals, CPU attention and bilinear sampling included."""
    counter = FlopCounterMode(display=False, custom_mapping=CUSTOM_FORMULAS)
    counter.mod_tracker = _TotalsOnly()
    return counter


def count_flops(run: Callable[[], Any]) -> int:
    """The FLOPs of ``run()`` (forward and backward, whatever it executes), counted on the real shapes."""
    with flop_counter() as counter:
        run()
    return counter.get_total_flops()


#: Dense peak FLOP/s (no sparsity) for chips Lightning's table misses: lower-case name fragment -> dtype -> peak
GPU_PEAKS: dict[str, dict[str, float]] = {
    "h200": {"bfloat16": 989.5e12, "float16": 989.5e12, "tf32": 494.7e12, "float32": 66.9e12},
    "h100": {"bfloat16": 989.5e12, "float16": 989.5e12, "tf32": 494.7e12, "float32": 66.9e12},
    "b200": {"bfloat16": 2.25e15, "float16": 2.25e15, "tf32": 1.1e15, "float32": 80e12},
    "gh200": {"bfloat16": 989.5e12, "float16": 989.5e12, "tf32": 494.7e12, "float32": 66.9e12},
    "l40s": {"bfloat16": 362e12, "float16": 362e12, "tf32": 183e12, "float32": 91.6e12},
}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's peak FLOP/s for ``dtype``: Lightning's GPU table, then the zoo's, then a measured CPU rate."""
    if device.type == "cpu":
        return measured_cpu_flops(dtype)
    if device.type != "cuda":
        return None
    from lightning.fabric.utilities.throughput import get_available_flops

    try:
        known = get_available_flops(device, dtype)
    except Exception:  # an unknown chip warns and gives None; a dtype it has no entry for may raise
        known = None
    if known:
        return float(known)
    name = torch.cuda.get_device_name(device).lower()
    key = str(dtype).removeprefix("torch.")
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        key = "tf32"
    for fragment, peaks in sorted(GPU_PEAKS.items(), key=lambda item: -len(item[0])):
        if fragment in name:
            return peaks.get(key)
    return None


@functools.cache
def measured_cpu_flops(dtype: torch.dtype = torch.float32, size: int = 512, seconds: float = 0.3) -> float:
    """Matrix-multiply FLOP/s on this CPU with the current thread count: the best of repeated ``size``-square
    products for about ``seconds`` (a CPU has no published peak to divide by; this is the rate it reaches)."""
    dtype = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
    generator = torch.Generator().manual_seed(0)  # its own stream: a fit's random draws stay as they were
    a, b = (torch.randn(size, size, generator=generator).to(dtype) for _ in range(2))
    torch.mm(a, b)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / max(time.perf_counter() - started, 1e-9))
    return best
