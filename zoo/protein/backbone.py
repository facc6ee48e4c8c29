"""The ESM-2 backbone as the Lightning modules build and read it: from a preset or a checkpoint, initialised
for training, pooled over residues, and a small valid batch of tokens for tracing.

``ESM2MaskedLM`` and the fine-tuners (``zoo.protein.finetune``) share these, so both spell the architecture
the same way: ``model_name`` (a published preset) + ``model_kwargs`` (overrides of its fields) or
``pretrained`` (a local checkpoint, whose architecture wins).
"""

from __future__ import annotations

import torch
from torch import nn

from zoo.protein.alphabet import Alphabet
from zoo.protein.model import ESM2

__all__ = [
    "EXAMPLE_SEQUENCE",
    "build_esm2",
    "example_tokens",
    "init_for_training",
    "init_module_for_training",
    "mean_over_residues",
    "residue_lengths",
]

#: The residues of ``example_tokens`` (the N-terminus of a real protein, every row the same).
EXAMPLE_SEQUENCE = "MKTAYIAKQRQISFVKSHFSRQ"


def build_esm2(model_name: str, model_kwargs: dict | None = None, pretrained: str | None = None) -> ESM2:
    """A checkpoint's model when ``pretrained`` is given, else the preset ``model_name`` with
    ``model_kwargs`` overrides, initialised for training from scratch (``init_for_training``)."""
    if pretrained is not None:
        return ESM2.from_pretrained(pretrained)
    return init_for_training(ESM2.from_config(model_name, **(model_kwargs or {})))


def init_for_training(model: ESM2, std: float = 0.02) -> ESM2:
    """BERT-style initialisation (normal, std 0.02, zero biases, zero ``<pad>`` embedding).

    This is how HF's ``EsmPreTrainedModel`` and BioNeMo initialise ESM-2 for pre-training. fair-esm's
    module defaults (unit-variance embeddings, tied to the LM head) give logits of standard deviation
    ~sqrt(embed_dim), a starting perplexity around 1e14 instead of ~33, and a slower start.
    """
    with torch.no_grad():
        for module in model.modules():
            init_module_for_training(module, std)
    return model


@torch.no_grad()
def init_module_for_training(module: nn.Module, std: float = 0.02) -> None:
    """:func:`init_for_training` for one submodule's own parameters, as meta-device materialisation
    (``zoo.strategies.materialize_parameters``) initialises a model part by part."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.normal_(0.0, std)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            module.weight[module.padding_idx].zero_()
        if getattr(module, "bias", None) is not None:
            module.bias.zero_()
    elif isinstance(module, nn.LayerNorm):
        module.reset_parameters()
    else:  # fair-esm's LM head: its weight is the (tied) embedding, its own parameter the bias
        for parameter in module.parameters(recurse=False):
            if parameter.dim() == 1:
                parameter.zero_()


def _residue_mask(tokens: torch.Tensor, alphabet: Alphabet) -> torch.Tensor:
    """True at residues, False at ``<cls>``/``<eos>``/``<pad>`` (comparisons, not ``torch.isin``: ONNX has no
    lowering of the ``searchsorted`` it becomes)."""
    return tokens.ne(alphabet.cls_idx) & tokens.ne(alphabet.eos_idx) & tokens.ne(alphabet.padding_idx)


def mean_over_residues(hidden: torch.Tensor, tokens: torch.Tensor, alphabet: Alphabet) -> torch.Tensor:
    """``(B, T, D)`` -> ``(B, D)``: the mean over residues, ``<cls>``/``<eos>``/pads excluded."""
    weights = _residue_mask(tokens, alphabet).unsqueeze(-1).to(hidden)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


def residue_lengths(tokens: torch.Tensor, alphabet: Alphabet) -> torch.Tensor:
    """Residues per row (tokens that are not ``<cls>``/``<eos>``/``<pad>``)."""
    return _residue_mask(tokens, alphabet).sum(1)


def example_tokens(alphabet: Alphabet, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(batch_size, L)`` token ids of ``EXAMPLE_SEQUENCE``: ``<cls>``, residues, ``<eos>`` in every row."""
    batch = [(f"example{row}", EXAMPLE_SEQUENCE) for row in range(batch_size)]
    return alphabet.get_batch_converter()(batch)[2].to(device)
