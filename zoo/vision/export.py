"""What ``zoo export`` writes for an image classifier: the ``classifier`` graph and the timm folder.

The graph is the network an ``ImageClassificationModule`` calls in ``forward`` and ``predict_step``: images
``(batch, channels, img_size, img_size)`` in, class logits out (a distilled DeiT's mean of its two heads, as it
evaluates). Only the batch varies: ViT/DeiT position embeddings and Swin's windows and attention masks are
built for ``img_size``.

Compressed models: structured pruning leaves plain (smaller) layers, which export as they are. Dynamic int8
``Linear`` layers (``Quantization(mode="dynamic")`` on CPU, ``torch.ao``) keep their weights in a packed
TorchScript object that ``torch.export`` cannot trace, so the graph gets ``DynamicInt8Linear`` instead: the
same int8 computation written with tensor operations (int8 weights stored as int8, the activation scale and
zero point chosen per call as fbgemm chooses them), whose results equal the int8 kernel's bit for bit on this
x86 (fbgemm) kernels (the export's parity check compares them; elsewhere it decides). Static int8 and QAT layers cannot be
rewritten this way and fail with an ``ExportError`` naming them.

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

__all__ = ["DynamicInt8Linear", "classifier_graph", "exportable_network", "write_timm_folder"]

#: fbgemm's smallest activation scale (``SMALL_SCALE_THRESHOLD``), a float32 constant.
_SMALL_SCALE = float(np.float32(6.1e-5))


def classifier_graph(network: nn.Module, example_inputs) -> ExportGraph:
    """The ``classifier`` graph: ``image`` in, ``logits`` out, dynamic batch."""
    graph = default_graph(
        exportable_network(network), example_inputs, name="classifier", output_name="logits"
    )
    graph.input_names = ("image",)
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


def _is_ao_quantized(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.ao.nn.quantized")


def exportable_network(network: nn.Module) -> nn.Module:
    """``network`` itself, or, when it holds dynamic int8 ``Linear`` layers, a copy where each is a
    ``DynamicInt8Linear`` (the module given stays as it is). Other ``torch.ao`` quantized layers (static int8,
    QAT) raise an ``ExportError`` naming the first and saying why."""
    import torch.ao.nn.quantized.dynamic as dynamic

    def swappable(module: nn.Module) -> bool:
        return type(module) is dynamic.Linear and module._packed_params.dtype == torch.qint8

    names = [name for name, module in network.named_modules() if swappable(module)]
    if names:
        network = copy.deepcopy(network)
        for name in names:
            parent, _, attribute = name.rpartition(".")
            owner = network.get_submodule(parent) if parent else network
            setattr(owner, attribute, DynamicInt8Linear(getattr(owner, attribute)))
    for name, module in network.named_modules():
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
            "--format timm: this network is quantized (torch.ao int8 modules), and timm builds float "
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
    return any(_is_ao_quantized(m) for m in network.modules())
