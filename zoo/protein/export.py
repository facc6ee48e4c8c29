"""What ``zoo export`` writes for ESM-2: graphs with a dynamic batch and sequence length, and the files
fair-esm and Hugging Face transformers load.

The graphs take ``tokens`` ``(batch, length)`` as the predict batches hold them (``<cls>``, residues,
``<eos>``, then ``<pad>``); the padding mask is derived from the tokens inside the graph, so a padded batch
needs no second input. ``length`` counts tokens, ``<cls>``/``<eos>`` included: one symbol for every axis
it sizes, with no upper bound (rotary positions have no table to run out of).

- ``esm2``: ``logits`` ``(B, T, 33)`` (MLM), ``residue_embeddings`` ``(B, T, D)`` (the ``embedding_layer``
  hidden states ``predict`` pools) and ``sequence_embedding`` ``(B, D)`` (their mean over residues: the
  ``predict`` record's ``embedding``). Attention through ``scaled_dot_product_attention``, as in eager.
- ``contacts``: ``(B, T-2, T-2)`` contact probabilities from the attention maps; row ``i`` of a padded
  batch is valid up to its own residue count (``predict`` crops it). Sequences of at least 2 residues.

Both graphs are traced and checked on padded batches with a ``<mask>`` token (token dropout rescales the
embedding by the share of masked residues).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from zoo.export import ExportGraph
from zoo.protein.alphabet import Alphabet
from zoo.protein.backbone import mean_over_residues
from zoo.protein.model import ESM2

__all__ = [
    "ESM2Contacts",
    "ESM2Outputs",
    "esm2_graphs",
    "esm2_library_exports",
    "export_tokens",
    "tokens_graph",
]

#: Rows of unequal lengths (so the batches are padded) with a ``<mask>``: the trace batch (2 rows) ...
TRACE_SEQUENCES = ("MKTAYIAKQRQISFVKSHFSRQLEERLG", "MKV<mask>LACDEFGH")
#: ... and the check batch (3 rows, another length).
CHECK_SEQUENCES = ("ACDEFGHIKLMNPQRSTVWY", "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRV", "GSX<mask>B")
#: The fewest tokens a graph takes: ``<cls>``, one residue, ``<eos>`` (contacts need two residues).
MIN_LENGTH = {"esm2": 3, "contacts": 4}


def export_tokens(
    alphabet: Alphabet, sequences: tuple[str, ...], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Padded ``(len(sequences), T)`` tokens, as the predict loader batches them."""
    converter = alphabet.get_batch_converter()
    return converter([(f"row{i}", s) for i, s in enumerate(sequences)])[2].to(device)


class ESM2Outputs(nn.Module):
    """``tokens`` -> ``{"logits", "residue_embeddings", "sequence_embedding"}`` (see the module docstring)."""

    def __init__(self, model: ESM2, layer: int) -> None:
        super().__init__()
        self.model = model
        self.layer = layer

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model(tokens, repr_layers=[self.layer])
        hidden = out["representations"][self.layer]
        return {
            "logits": out["logits"],
            "residue_embeddings": hidden,
            "sequence_embedding": mean_over_residues(hidden, tokens, self.model.alphabet),
        }


class ESM2Contacts(nn.Module):
    """``tokens`` -> contact probabilities ``(B, T-2, T-2)``."""

    def __init__(self, model: ESM2) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, return_contacts=True)["contacts"]


def tokens_graph(name: str, module: nn.Module, alphabet: Alphabet, output_names: tuple[str, ...],
                 device: torch.device | str = "cpu", min_length: int = 3) -> ExportGraph:  # fmt: skip
    """A graph of ``module(tokens)`` with a dynamic batch and length, traced and checked on padded batches."""
    return ExportGraph(
        name=name,
        module=module.eval(),
        inputs=(export_tokens(alphabet, TRACE_SEQUENCES, device),),
        check_inputs=(export_tokens(alphabet, CHECK_SEQUENCES, device),),
        input_names=("tokens",),
        output_names=output_names,
        dynamic_dims=({0: "batch", 1: "length"},),
        dim_ranges={"length": (min_length, None)},
    )


def esm2_graphs(model: ESM2, layer: int, device: torch.device | str = "cpu") -> list[ExportGraph]:
    """The ``esm2`` graph (logits and embeddings of ``layer``) and the ``contacts`` graph."""
    return [
        tokens_graph(
            "esm2",
            ESM2Outputs(model, layer),
            model.alphabet,
            ("logits", "residue_embeddings", "sequence_embedding"),
            device,
            MIN_LENGTH["esm2"],
        ),
        tokens_graph(
            "contacts", ESM2Contacts(model), model.alphabet, ("contacts",), device, MIN_LENGTH["contacts"]
        ),
    ]


def esm2_library_exports(model: Callable[[], ESM2]) -> dict[str, Callable[[Path], list[Path]]]:
    """``{"hf": a transformers EsmForMaskedLM folder, "fair-esm": a fair-esm checkpoint}`` of the network
    ``model()`` returns (called when writing, so a fine-tuner can merge its LoRA adapters first)."""
    from zoo.protein.convert import save_fair_esm, save_hf

    def hf(folder: Path) -> list[Path]:
        save_hf(model(), folder)
        return sorted(p for pattern in ("config.json", "model*.safetensors*") for p in folder.glob(pattern))

    def fair_esm(folder: Path) -> list[Path]:
        # fair-esm picks its ESM-2 loader by the file name's "esm2" prefix, and reads the contact regression
        # from "<stem>-contact-regression.pt" beside the file
        network = model()
        path = save_fair_esm(network, folder / f"esm2_t{network.num_layers}_{network.embed_dim}d.pt")
        return [path, path.with_name(f"{path.stem}-contact-regression.pt")]

    return {"hf": hf, "fair-esm": fair_esm}
