"""``ESM2MaskedLM``: ESM-2 masked-language-model training (from scratch or from a checkpoint).

Masking follows ESM-2/BERT: 15% of residues (never ``<cls>``/``<eos>``/``<pad>``) are chosen;
80% become ``<mask>``, 10% a random amino acid, 10% stay. The loss is cross-entropy on the
chosen positions only, and perplexity is ``exp`` of that loss over all masked tokens of an
epoch. Validation masks with a generator seeded by the batch index, so its perplexity is
comparable from epoch to epoch.

When validation or test batches carry ``contacts`` (``ProteinDataModule(contacts=...)``), the unmasked
sequences also go through the contact head and contact precision (``ContactPrecision``: P@L and
P@L/5, short/medium/long range) is logged as ``val/contact_P@L_long`` etc. ``predict`` returns one
record per protein: its embedding (mean over residues of ``embedding_layer``) and, with
``predict_contacts``, its contact map.

``zoo export`` writes the ``esm2`` and ``contacts`` graphs (pt2, ONNX) or the ``hf`` / ``fair-esm`` files
(``zoo.protein.export``); ``zoo serve`` answers ``{"sequence": ...}`` requests with the predict record.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.text import Perplexity

from zoo.base import DEFAULT_GROUP, IGNORE_INDEX, ZooModule
from zoo.optim import WarmupCosineLR
from zoo.protein.alphabet import Alphabet
from zoo.protein.backbone import (
    build_esm2,
    example_tokens,
    init_module_for_training,
    mean_over_residues,
    residue_lengths,
)
from zoo.protein.checkpoints import OldSizeArguments
from zoo.protein.metrics import ContactPrecision
from zoo.protein.model import ESM2Layer

__all__ = ["CONTACTS", "ESM2MaskedLM", "mask_tokens"]

#: Metric group of contact precision, updated in validation and test when the data has contact maps.
CONTACTS = "contacts"


def mask_tokens(
    tokens: torch.Tensor,
    alphabet: Alphabet,
    mask_prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, labels)``: labels hold the original token at chosen positions, ``-100`` elsewhere.

    At least one residue per batch is chosen, so a short batch never yields an empty loss.
    """

    def draw(high: int | None = None) -> torch.Tensor:  # on the generator's device, then moved
        device = generator.device if generator is not None else tokens.device
        if high is None:
            values = torch.rand(tokens.shape, generator=generator, device=device)
        else:
            values = torch.randint(high, tokens.shape, generator=generator, device=device)
        return values.to(tokens.device)

    special = torch.tensor([alphabet.cls_idx, alphabet.eos_idx, alphabet.padding_idx], device=tokens.device)
    maskable = ~torch.isin(tokens, special)
    chosen = maskable & (draw() < mask_prob)
    if not chosen.any() and maskable.any():
        chosen.view(-1)[maskable.view(-1).nonzero()[0]] = True
    action = draw()
    amino = torch.tensor(alphabet.amino_acid_ids, device=tokens.device)
    random_ids = amino[draw(len(amino))]
    inputs = tokens.clone()
    inputs[chosen & (action < 0.8)] = alphabet.mask_idx
    replace = chosen & (action >= 0.8) & (action < 0.9)
    inputs[replace] = random_ids[replace]
    labels = torch.where(chosen, tokens, torch.full_like(tokens, IGNORE_INDEX))
    return inputs, labels


class ESM2MaskedLM(OldSizeArguments, ZooModule):
    """ESM-2 trained by masked language modelling.

    Args:
        model_name: a published architecture, ``esm2_t6_8M`` ... ``esm2_t48_15B`` (``t6_8M`` and
            ``esm2_t6_8M_UR50D`` spellings are read too).
        model_kwargs: overrides of the preset's ``ESM2Config`` fields (``num_layers``, ``embed_dim``,
            ``attention_heads``, ``token_dropout``), e.g. a tiny test model.
        pretrained: a local checkpoint for ``ESM2.from_pretrained`` (fair-esm ``.pt`` or a HF
            ``EsmForMaskedLM`` directory); its architecture wins over ``model_name`` and ``model_kwargs``.
        mask_prob: share of residues chosen for the loss (15% in ESM-2).
        embedding_layer: layer whose residue mean ``predict`` returns (-1: the last, after its LayerNorm).
        predict_contacts: ``predict`` also returns each sequence's ``(L, L)`` contact map.
        compile: ``torch.compile`` the network (``self.model``) when a trainer sets the module up: ``true``, or a
            dict of ``torch.compile`` options (``mode``, ``fullgraph``, ``dynamic``, ``backend``, ``options``);
            checkpoints are the same as without it (``ZooModule.compile_network``).
    """

    sharding_units = (ESM2Layer,)
    progress_bar_metrics = ("val/perplexity",)

    def __init__(
        self,
        model_name: str = "esm2_t6_8M",
        model_kwargs: dict | None = None,
        pretrained: str | None = None,
        mask_prob: float = 0.15,
        embedding_layer: int = -1,
        predict_contacts: bool = False,
        compile: bool | dict = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
    ) -> None:
        if not 0 < mask_prob < 1:
            raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
        super().__init__(optimizer, lr_scheduler)

    def configure_models(self) -> None:
        hp = self.hparams
        self.model = build_esm2(hp.model_name, hp.model_kwargs, hp.pretrained)
        if not -self.model.num_layers - 1 <= hp.embedding_layer <= self.model.num_layers:
            raise ValueError(
                f"embedding_layer={hp.embedding_layer} outside 0..{self.model.num_layers} (or -1)"
            )
        # The contact regression is fitted apart from MLM (logistic regression on a few structures, as
        # fair-esm's): frozen here, so that DDP does not wait for gradients MLM never produces.
        self.model.contact_head.requires_grad_(False)
        self.alphabet = self.model.alphabet

    def configure_metrics(self) -> dict[str, MetricCollection]:
        return {
            DEFAULT_GROUP: MetricCollection({"perplexity": Perplexity(ignore_index=IGNORE_INDEX)}),
            CONTACTS: MetricCollection({"precision": ContactPrecision()}, prefix="contact_"),
        }

    def init_weights(self, module: nn.Module) -> None:
        """Per-part training init, called when a meta-device build is materialised under FSDP2."""
        init_module_for_training(module)

    def example_inputs(self, batch_size: int = 2) -> tuple[torch.Tensor]:
        return (example_tokens(self.alphabet, batch_size, self.device),)

    def batch_tokens(self, batch: dict) -> int:
        """Tokens in a batch, padding excluded (tokens/s of ``zoo.callbacks.ThroughputMonitor``)."""
        return int((batch["tokens"] != self.alphabet.padding_idx).sum())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """MLM logits ``(B, T, 33)``: the prediction the loss is computed on."""
        return self.model(tokens)["logits"]

    def export_graphs(self) -> list:
        """``esm2`` (MLM logits, ``embedding_layer`` per residue and pooled) and ``contacts``, each with a dynamic
        batch and sequence length (``zoo.protein.export``)."""
        from zoo.protein.export import esm2_graphs

        return esm2_graphs(
            self.model, self.hparams.embedding_layer % (self.model.num_layers + 1), self.device
        )

    def library_exports(self) -> dict:
        """``hf`` (a transformers ``EsmForMaskedLM`` folder) and ``fair-esm`` (a checkpoint fair-esm loads)."""
        from zoo.protein.export import esm2_library_exports

        return esm2_library_exports(lambda: self.model)

    def _step(self, batch: dict, stage: str, generator: torch.Generator | None = None) -> torch.Tensor:
        inputs, labels = mask_tokens(batch["tokens"], self.alphabet, self.hparams.mask_prob, generator)
        logits = self(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(inputs))
        self.update_metrics(stage, logits.detach().float(), labels)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self._update_contacts(batch, "val")
        return self._step(batch, "val", torch.Generator().manual_seed(batch_idx))

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self._update_contacts(batch, "test")
        return self._step(batch, "test", torch.Generator().manual_seed(batch_idx))

    def _update_contacts(self, batch: dict, stage: str) -> None:
        if "contacts" not in batch:
            return
        tokens = batch["tokens"]
        predicted = self.model(tokens, return_contacts=True)["contacts"]
        lengths = residue_lengths(tokens, self.alphabet)
        self.update_metrics(stage, predicted, batch["contacts"], lengths, group=CONTACTS)

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """One record per protein: ``{"id": FASTA id, "embedding": (D,) tensor}``, plus ``"contacts"``: its
        ``(L, L)`` contact probabilities (L residues) with ``predict_contacts``.

        The embedding is the mean over residues of ``embedding_layer``'s hidden states.
        """
        tokens = batch["tokens"]
        layer = self.hparams.embedding_layer % (self.model.num_layers + 1)
        out = self.model(tokens, repr_layers=[layer], return_contacts=self.hparams.predict_contacts)
        embeddings = mean_over_residues(out["representations"][layer], tokens, self.alphabet)
        records = [
            {"id": record_id, "embedding": embedding}
            for record_id, embedding in zip(batch["ids"], embeddings)
        ]
        if self.hparams.predict_contacts:
            lengths = residue_lengths(tokens, self.alphabet).tolist()
            for record, contacts, n in zip(records, out["contacts"], lengths):
                record["contacts"] = contacts[:n, :n]
        return records
