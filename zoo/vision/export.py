"""What ``zoo export`` writes for an image classifier: the ``classifier`` graph and the timm folder.

The graph is the network an ``ImageClassificationModule`` calls in ``forward`` and ``predict_step``: images
``(batch, channels, img_size, img_size)`` in, class logits out (a distilled DeiT's mean of its two heads, as it
evaluates). Only the batch varies: ViT/DeiT position embeddings and Swin's windows and attention masks are
built for ``img_size``.

Compressed models: structured pruning leaves plain (smaller) layers, which export as they are. Int8 layers
are rewritten in tensor operations that ``torch.export`` and ONNX take, computing what the int8 kernel computes
(int8 weights stay int8 in the file; integer products are summed exactly in float64):

- torchao int8 (``Quantization`` dynamic, static and QAT: an ``nn.Linear`` whose weight is a torchao
  ``Int8Tensor``) becomes ``TorchaoInt8Linear``: torchao's activation quantization (per token, or the calibrated
  per-tensor scale of static int8), its int8 matmul and rescale, in the same order, so the results equal
  torchao's bit for bit (the export's parity check compares them).
- ``torch.ao`` dynamic int8 (checkpoints written before the move to torchao) keeps its weights in a packed
  TorchScript object ``torch.export`` cannot trace, so it becomes ``DynamicInt8Linear``: fbgemm's arithmetic
  (activation scale and zero point chosen per call as fbgemm chooses them), equal to the kernel bit for bit
  on x86. ``torch.ao`` static int8 and QAT layers cannot be rewritten this way and fail with an
  ``ExportError`` naming them.

The timm folder is what ``timm.save_for_hf`` writes (the Hugging Face Hub layout of timm models):
``model.safetensors`` with the timm network's state dict and ``config.json`` (``architecture``,
``num_classes``, ``model_args``, ``pretrained_cfg`` with the input size and normalisation). See
``write_timm_folder``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from zoo.export import ExportError, ExportGraph, default_graph

__all__ = [
    "DynamicInt8Linear",
    "TorchaoInt8Linear",
    "classifier_graph",
    "exportable_network",
    "write_timm_folder",
]

#: fbgemm's smallest activation scale (``SMALL_SCALE_THRESHOLD``), a float32 constant.
_SMALL_SCALE = float(np.float32(6.1e-5))


#: The parity tolerance of a graph with int8 layers, as a fraction of its logits' standard deviation.
INT8_ROUNDING_TOLERANCE = 0.1


def classifier_graph(network: nn.Module, example_inputs) -> ExportGraph:
    """The ``classifier`` graph: ``image`` in, ``logits`` out, dynamic batch.

    With int8 layers the parity tolerance is ``INT8_ROUNDING_TOLERANCE`` of the logits' spread (or the usual
    1e-4, if larger). The pt2 graph runs PyTorch's own kernels and matches exactly (0), but ONNX Runtime's
    LayerNorm, softmax, GELU and GEMM differ from PyTorch's in the last bits, and an activation quantized on the
    fly can then round to the neighbouring int8 step. torchao's per-token scales (one per row, set by the row's
    largest value) leave many values near a rounding boundary: a few flips moved a 12-block DeiT-Ti's logits by
    up to 4% of their standard deviation. ``torch.ao``'s per-tensor scales make flips rarer, not impossible:
    its ONNX files matched to 1e-7 where first measured, and a pruned 2-block DeiT-Ti's by 0.008 on an AVX2-only
    AMD EPYC.
    """
    network = exportable_network(network)
    graph = default_graph(network, example_inputs, name="classifier", output_name="logits")
    graph.input_names = ("image",)
    if any(isinstance(m, (TorchaoInt8Linear, DynamicInt8Linear)) for m in network.modules()):
        with torch.no_grad():
            spread = network(*graph.inputs).float().std().item()
        graph.tolerance = max(graph.tolerance, INT8_ROUNDING_TOLERANCE * spread)
    return graph


# --------------------------------------------------------------------------- int8 layers
def _activation_qparams(x: Tensor, qmin: int, qmax: int) -> tuple[Tensor, Tensor]:
    """Scale (float32) and zero point (float64) of a dynamically quantized activation, as fbgemm's
    ``ChooseQuantizationParams`` computes them: the range extended to hold 0, double-precision arithmetic,
    the zero point from whichever end adds the smaller rounding error."""
    low, high = x.min().clamp(max=0.0), x.max().clamp(min=0.0)
    scale = (high.double() - low.double()) / (qmax - qmin)
    degenerate = (scale.float() == 0) | torch.isinf(1.0 / scale.float())
    scale = torch.where(degenerate, torch.full_like(scale, 0.1), scale)
    # a range too small for float32 reciprocals is widened to the smallest scale, keeping its proportions
    small = scale < _SMALL_SCALE
    amplifier = _SMALL_SCALE / scale.float()
    span = torch.full_like(low, _SMALL_SCALE * (qmax - qmin))
    small_low = torch.where(low == 0, low, torch.where(high == 0, -span, low * amplifier))
    small_high = torch.where(low == 0, span, torch.where(high == 0, high, high * amplifier))
    low, high = torch.where(small, small_low, low), torch.where(small, small_high, high)
    scale = torch.where(small, torch.full_like(scale, _SMALL_SCALE), scale)
    low_steps, high_steps = low.double() / scale, high.double() / scale
    from_low = (abs(qmin) - low_steps.abs()) < (abs(qmax) - high_steps.abs())
    zero = torch.where(from_low, qmin - low_steps, qmax - high_steps).clamp(qmin, qmax).round()
    return scale.float(), zero


class DynamicInt8Linear(nn.Module):
    """``torch.ao.nn.quantized.dynamic.Linear`` (int8 weights, activations quantized per call) in tensor
    operations that ``torch.export`` and ONNX take.

    Called eagerly it runs the original module (the int8 kernel); while ``torch.export`` traces it, the same
    arithmetic as fbgemm: uint8 activations ``round(x * (1 / scale)) + zero``, the int8 products summed
    exactly (in float64, exact for these integers), then ``float(sum) * (scale * weight_scale) + bias``
    fused. The weights stay int8 in the exported file.
    """

    def __init__(self, quantized: nn.Module) -> None:
        super().__init__()
        weight, bias = quantized._packed_params._weight_bias()
        if weight.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            scale, zero = torch.tensor([weight.q_scale()]), torch.tensor([float(weight.q_zero_point())])
        else:
            scale, zero = weight.q_per_channel_scales(), weight.q_per_channel_zero_points()
        self.register_buffer("weight_int8", weight.int_repr())
        self.register_buffer("weight_scale", scale.float())
        self.register_buffer("weight_zero_point", zero.double().view(-1, 1))
        self.register_buffer("bias", torch.zeros(weight.shape[0]) if bias is None else bias.detach().float())
        # version 4 modules (torch >= 1.5) quantize activations to 7 bits, which the x86 kernels need
        reduce_range = (getattr(quantized, "version", None) or 0) >= 4
        self.qmin, self.qmax = 0, 127 if reduce_range else 255
        self._kernel = (quantized,)  # a tuple, so the packed module stays out of the traced module tree

    def forward(self, x: Tensor) -> Tensor:
        if not torch.compiler.is_exporting():
            return self._kernel[0](x)
        flat = x.reshape(-1, x.shape[-1])
        scale, zero = _activation_qparams(flat, self.qmin, self.qmax)
        quantized = (torch.round(flat * (1.0 / scale)).double() + zero).clamp(0, 255)
        weight = self.weight_int8.double() - self.weight_zero_point
        summed = (quantized - zero) @ weight.T
        rescale = (scale * self.weight_scale).double()
        out = (summed.float().double() * rescale + self.bias.double()).float()
        return out.reshape(*x.shape[:-1], -1).to(x.dtype)

    def extra_repr(self) -> str:
        out_features, in_features = self.weight_int8.shape
        return f"in_features={in_features}, out_features={out_features}, int8 (dynamic)"


class TorchaoInt8Linear(nn.Module):
    """An ``nn.Linear`` with a torchao ``Int8Tensor`` weight (dynamic, static or QAT-converted int8) in tensor
    operations that ``torch.export`` and ONNX take.

    Called eagerly it runs the original layer (torchao's kernel); while ``torch.export`` traces it, torchao's
    arithmetic (``Int8Tensor``'s linear): activations quantized to int8 with a per-token scale (symmetric, or
    asymmetric with a zero point for QAT) or the calibrated per-tensor scale (static), ``round(x * (1 / scale))``;
    the int8 products summed exactly (float64, exact for these integers) and converted to float32 as torchao's
    int32 result is, times the activation scale, less the zero-point term, times the weight's per-channel scale,
    plus the bias.
    """

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        from torchao.quantization.quant_primitives import MappingType

        weight = layer.weight
        kwargs = weight.act_quant_kwargs
        self.register_buffer("weight_int8", weight.qdata.detach())
        self.register_buffer("weight_scale", weight.scale.detach().float().flatten())
        self.register_buffer("weight_row_sums", weight.qdata.detach().sum(dim=-1).float())
        bias = torch.zeros(weight.shape[0]) if layer.bias is None else layer.bias.detach().float()
        self.register_buffer("bias", bias)
        static = weight.act_quant_scale
        self.register_buffer(
            "activation_scale", None if static is None else static.detach().float().reshape(1, 1)
        )
        self.asymmetric = kwargs.mapping_type == MappingType.ASYMMETRIC
        self.qmin, self.qmax = (-64, 63) if kwargs.reduce_range else (-128, 127)
        self._kernel = (layer,)  # a tuple, so the quantized layer stays out of the traced module tree

    def _quantize(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """torchao's ``choose_qparams_affine`` per row (eps: float32's) and ``quantize_affine``, op for op."""
        eps = torch.finfo(torch.float32).eps
        zero = None
        if self.activation_scale is not None:
            scale = self.activation_scale
        else:
            low = x.amin(dim=-1, keepdim=True).clamp(max=0.0)
            high = x.amax(dim=-1, keepdim=True).clamp(min=0.0)
            if self.asymmetric:
                scale = ((high - low) / float(self.qmax - self.qmin)).clamp(min=eps)
                zero = (self.qmin - torch.round(low / scale)).clamp(self.qmin, self.qmax)
            else:
                scale = (torch.maximum(-low, high) / ((self.qmax - self.qmin) / 2)).clamp(min=eps)
        quantized = torch.round(x * (1.0 / scale))
        quantized = (quantized if zero is None else quantized + zero).clamp(self.qmin, self.qmax)
        return quantized, scale, zero

    def forward(self, x: Tensor) -> Tensor:
        if not torch.compiler.is_exporting():
            return self._kernel[0](x)
        flat = x.reshape(-1, x.shape[-1]).float()
        quantized, scale, zero = self._quantize(flat)
        summed = (quantized.double() @ self.weight_int8.double().T).float()
        out = summed * scale
        if zero is not None:
            out = out - (zero * scale) * self.weight_row_sums
        out = out * self.weight_scale + self.bias
        return out.reshape(*x.shape[:-1], -1).to(x.dtype)

    def extra_repr(self) -> str:
        out_features, in_features = self.weight_int8.shape
        kind = "static" if self.activation_scale is not None else "dynamic"
        return f"in_features={in_features}, out_features={out_features}, int8 ({kind}, torchao)"


def _is_ao_quantized(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.ao.nn.quantized")


def _torchao_weight(module: nn.Module) -> bool:
    """A layer whose weight is a torchao tensor (int8, int4) rather than a plain float tensor."""
    weight = getattr(module, "_parameters", {}).get("weight")
    return weight is not None and type(weight).__module__.startswith("torchao")


def _torchao_int8(module: nn.Module) -> bool:
    weight = module.weight if _torchao_weight(module) else None
    return (
        isinstance(module, nn.Linear)
        and type(weight).__name__ == "Int8Tensor"
        and weight.act_quant_kwargs is not None
        and weight.act_pre_scale is None
        and weight.qdata.ndim == 2
    )


def exportable_network(network: nn.Module) -> nn.Module:
    """``network`` itself, or, when it holds int8 ``Linear`` layers, a copy where each torchao int8 layer is a
    ``TorchaoInt8Linear`` and each ``torch.ao`` dynamic one a ``DynamicInt8Linear`` (the module given stays as
    it is). Other quantized layers (``torch.ao`` static int8 and QAT, torchao int4) raise an ``ExportError``
    naming the first and saying why."""

    def legacy_dynamic(module: nn.Module) -> bool:
        if not _is_ao_quantized(module):
            return False
        import torch.ao.nn.quantized.dynamic as dynamic

        return type(module) is dynamic.Linear and module._packed_params.dtype == torch.qint8

    rewrites = {
        name: TorchaoInt8Linear if _torchao_int8(module) else DynamicInt8Linear
        for name, module in network.named_modules()
        if _torchao_int8(module) or legacy_dynamic(module)
    }
    if rewrites:
        network = copy.deepcopy(network)
        for name, rewrite in rewrites.items():
            parent, _, attribute = name.rpartition(".")
            owner = network.get_submodule(parent) if parent else network
            setattr(owner, attribute, rewrite(getattr(owner, attribute)))
    for name, module in network.named_modules():
        if _torchao_weight(module):
            raise ExportError(
                f"{name} has a {type(module.weight).__name__} weight (torchao) that the export cannot rewrite "
                "(only int8 Linear layers are); export the float checkpoint saved before quantization"
            )
        if _is_ao_quantized(module) and not isinstance(module, DynamicInt8Linear):
            raise ExportError(
                f"{name} is a {type(module).__module__}.{type(module).__name__} (static int8 or "
                "quantization-aware training): its int8 weights sit in a packed TorchScript object and its "
                "activations are quantized tensors, which torch.export cannot trace, so neither pt2 nor onnx "
                "can be written. Only dynamic int8 (Quantization(mode='dynamic')) exports; or export the "
                "float checkpoint saved before quantization."
            )
    return network


# --------------------------------------------------------------------------- timm folder
#: config.json key naming a zoo layer that timm cannot build from JSON (the convolutional stem)
ZOO_KEY = "zoo"


def write_timm_folder(network: nn.Module, folder: str | Path, class_names: list[str] | None = None,
                      mean: tuple[float, ...] = (0.5, 0.5, 0.5),
                      std: tuple[float, ...] = (0.5, 0.5, 0.5)) -> list[Path]:  # fmt: skip
    """``model.safetensors`` + ``config.json`` of a timm network, written by timm (``save_for_hf``).

    ``timm.create_model(architecture, pretrained=True, pretrained_cfg_overlay=dict(file=<model.safetensors>,
    num_classes=<num_classes>), **model_args)`` rebuilds it (``model_args`` holds ``num_classes``, ``img_size``,
    ``patch_size`` and the other arguments the network was built with); ``num_classes`` must be in the
    overlay too (or the whole ``pretrained_cfg`` of config.json), otherwise timm compares the file with its
    1000 ImageNet classes and drops the head. A network with the zoo's convolutional stem also needs ``embed_layer=ConvStemPatchEmbed``
    (``zoo.layers``), named under config.json's ``"zoo"`` key since JSON cannot hold a class.
    """
    from timm.models import save_for_hf

    from zoo.layers import ConvStemPatchEmbed

    if _is_quantized(network):
        raise ExportError(
            "--format timm: this network is quantized (int8 or int4 layers), and timm builds float "
            "networks only; export pt2 (which keeps int8) or the float checkpoint saved before quantization"
        )
    folder = Path(folder)
    conv_stem = isinstance(getattr(network, "patch_embed", None), ConvStemPatchEmbed)
    model_args = {"embed_layer": "conv_stem"} if conv_stem else None  # a placeholder timm's check accepts
    model_config = {"label_names": list(class_names)} if class_names else None
    # the evaluation transform of ImageClassificationDataModule (timm's create_transform defaults)
    data_config = {"mean": tuple(mean), "std": tuple(std), "crop_pct": 0.875, "interpolation": "bilinear"}
    save_for_hf(network, folder, model_config=model_config, model_args=model_args,
                safe_serialization=True, data_config=data_config)  # fmt: skip
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    # these weights are the zoo's: not the ImageNet weights (and their licence) timm's default tag names
    config["pretrained_cfg"]["tag"] = "zoo"
    config["pretrained_cfg"].pop("license", None)
    if conv_stem:
        del config["model_args"]["embed_layer"]
        config[ZOO_KEY] = {"embed_layer": "zoo.layers.ConvStemPatchEmbed"}
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return [folder / "model.safetensors", config_path]


def _is_quantized(network: nn.Module) -> bool:
    return any(_is_ao_quantized(m) or _torchao_weight(m) for m in network.modules())
