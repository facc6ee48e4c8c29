"""Compression callbacks: pruning, quantization and weight sharing that make models really smaller and faster.

All are chainable in one config (``trainer.callbacks``) and work on any LightningModule; each step records the
architecture change in the checkpoint (``zoo_compression``) so ``zoo validate --ckpt_path`` rebuilds it.

- ``MagnitudePruning``: unstructured magnitude pruning (global or per layer) on a cubic schedule (Zhu & Gupta
  2017) over epochs or steps; Lightning's ``ModelPruning`` + ``torch.nn.utils.prune`` masks, made permanent.
- ``StructuredPruning``: removes attention heads and MLP units of any zoo transformer, whole ViT blocks (by L1/L2/Taylor importance, Block
  Influence) and conv channels (``torch_pruning``), before fine-tuning.
- ``Quantization``: torchao int8 dynamic, static int8 calibrated on validation batches, quantization-aware
  training, and GPTQ 4-bit weight-only Linear layers (torchao int4 tensors).
- ``WeightSharing``: k-means codebooks per layer with centroid fine-tuning (Deep Compression).
"""

from zoo.callbacks.compression.gptq import (
    Int4Linear,
    TorchaoInt4Linear,
    gptq_quantize,
    quantize_int4_gptq,
    rtn_quantize,
)
from zoo.callbacks.compression.quantization import Quantization, quantize_dynamic_int8, quantize_static_int8
from zoo.callbacks.compression.records import load_compressed, replay, state_dict_bytes
from zoo.callbacks.compression.structured import (
    StructuredPruning,
    block_influence,
    prune_attention_heads,
    prune_conv_channels,
    prune_mlp_units,
    prune_transformer,
)
from zoo.callbacks.compression.unstructured import MagnitudePruning, cubic_sparsity, sparsity_report
from zoo.callbacks.compression.weight_sharing import WeightSharing, kmeans_1d, share_weights, storage_report

__all__ = [
    "Int4Linear",
    "MagnitudePruning",
    "Quantization",
    "StructuredPruning",
    "TorchaoInt4Linear",
    "WeightSharing",
    "block_influence",
    "cubic_sparsity",
    "gptq_quantize",
    "kmeans_1d",
    "load_compressed",
    "prune_attention_heads",
    "prune_conv_channels",
    "prune_mlp_units",
    "prune_transformer",
    "quantize_dynamic_int8",
    "quantize_int4_gptq",
    "quantize_static_int8",
    "replay",
    "rtn_quantize",
    "share_weights",
    "sparsity_report",
    "state_dict_bytes",
    "storage_report",
]
