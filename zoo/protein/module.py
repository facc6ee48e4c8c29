"""``ESM2MaskedLM``: ESM-2 masked-language-model training (from scratch or from a checkpoint).

Masking follows ESM-2/BERT: 15% of residues (never ``<cls>``/``<eos>``/``<pad>``) are chosen;
80% become ``<mask>``, 10% a random amino acid, 10% stay. The loss is cross-entropy on the
chosen positions only, and perplexity is ``exp`` of that loss over all masked tokens of an
epoch. Validation masks with a generator seeded by the batch index, so its perplexity is
comparable from epoch to epoch.

When validation batches carry ``contacts`` (``ProteinDataModule(contacts=...)``), the unmasked
sequences also go through the contact head and contact precision (``ContactPrecision``: P@L and
P@L/5, short/medium/long range) is logged as ``val/contact_P@L_long`` etc. ``predict`` returns
per-sequence embeddings (mean over residues of ``embedding_layer``) and, with
``predict_contacts``, contact maps, for ``RecordPredictionWriter``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.text import Perplexity

from zoo.base import ZooModule
from zoo.optim import WarmupCosineLR
from zoo.protein.alphabet import Alphabet
from zoo.protein.metrics import ContactPrecision
from zoo.protein.model import ESM2, ESM2_CONFIGS, ESM2Layer

__all__ = [
    "ESM2MaskedLM",
    "build_esm2",
    "init_for_training",
    "init_module_for_training",
    "mask_tokens",
    "mean_over_residues",
]

IGNORE_INDEX = -100


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


def build_esm2(
    size: str,
    num_layers: int | None = None,
    embed_dim: int | None = None,
    attention_heads: int | None = None,
    pretrained: str | None = None,
) -> ESM2:
    """A checkpoint's model when ``pretrained`` is given, else a published size with optional overrides,
    initialised for training from scratch (``init_for_training``)."""
    if pretrained is not None:
        return ESM2.from_pretrained(pretrained)
    if size not in ESM2_CONFIGS:
        raise ValueError(f"unknown ESM-2 size {size!r}; known: {', '.join(ESM2_CONFIGS)}")
    base = ESM2_CONFIGS[size]
    model = ESM2(
        num_layers if num_layers is not None else base.num_layers,
        embed_dim if embed_dim is not None else base.embed_dim,
        attention_heads if attention_heads is not None else base.attention_heads,
        token_dropout=base.token_dropout,
    )
    return init_for_training(model)


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


def mean_over_residues(hidden: torch.Tensor, tokens: torch.Tensor, alphabet: Alphabet) -> torch.Tensor:
    """``(B, T, D)`` -> ``(B, D)``: the mean over residues, ``<cls>``/``<eos>``/pads excluded."""
    special = torch.tensor([alphabet.cls_idx, alphabet.eos_idx, alphabet.padding_idx], device=tokens.device)
    weights = (~torch.isin(tokens, special)).unsqueeze(-1).to(hidden)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


def residue_lengths(tokens: torch.Tensor, alphabet: Alphabet) -> torch.Tensor:
    """Residues per row (tokens that are not ``<cls>``/``<eos>``/``<pad>``)."""
    special = torch.tensor([alphabet.cls_idx, alphabet.eos_idx, alphabet.padding_idx], device=tokens.device)
    return (~torch.isin(tokens, special)).sum(1)


class ESM2MaskedLM(ZooModule):
    """ESM-2 trained by masked language modelling.

    Args:
        size: a published architecture (``t6_8M`` ... ``t48_15B``), overridable field by field
            with ``num_layers`` / ``embed_dim`` / ``attention_heads`` (e.g. tiny test models).
        pretrained: a local checkpoint for ``ESM2.from_pretrained`` (fair-esm ``.pt`` or a HF
            ``EsmForMaskedLM`` directory); its architecture wins over ``size``.
        mask_prob: share of residues chosen for the loss (15% in ESM-2).
        embedding_layer: layer whose residue mean ``predict`` returns (-1: the last, after its LayerNorm).
        predict_contacts: ``predict`` also returns each sequence's ``(L, L)`` contact map.
    """

    sharding_units = (ESM2Layer,)

    def __init__(
        self,
        size: str = "t6_8M",
        num_layers: int | None = None,
        embed_dim: int | None = None,
        attention_heads: int | None = None,
        pretrained: str | None = None,
        mask_prob: float = 0.15,
        embedding_layer: int = -1,
        predict_contacts: bool = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if not 0 < mask_prob < 1:
            raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
        self.model = build_esm2(size, num_layers, embed_dim, attention_heads, pretrained)
        if not -self.model.num_layers - 1 <= embedding_layer <= self.model.num_layers:
            raise ValueError(f"embedding_layer={embedding_layer} outside 0..{self.model.num_layers} (or -1)")
        # The contact regression is fitted apart from MLM (logistic regression on a few structures, as
        # fair-esm's): frozen here, so that DDP does not wait for gradients MLM never produces.
        self.model.contact_head.requires_grad_(False)
        self.alphabet = self.model.alphabet
        self.contact_metrics = nn.ModuleDict({"val": ContactPrecision(), "test": ContactPrecision()})
        self.setup_metrics()

    def configure_metrics(self) -> MetricCollection:
        return MetricCollection({"perplexity": Perplexity(ignore_index=IGNORE_INDEX)})

    def init_weights(self, module: nn.Module) -> None:
        """Per-part training init, called when a meta-device build is materialised under FSDP2."""
        init_module_for_training(module)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """MLM logits ``(B, T, 33)``: the prediction the loss is computed on."""
        return self.model(tokens)["logits"]

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
        self.contact_metrics[stage].update(
            predicted, batch["contacts"], residue_lengths(tokens, self.alphabet)
        )

    def _log_contacts(self, stage: str) -> None:
        metric = self.contact_metrics[stage]
        if metric.update_count == 0:
            return
        values = metric.compute()
        self.log_dict({f"{stage}/contact_{k}": v for k, v in values.items()}, sync_dist=False)
        metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_contacts("val")

    def on_test_epoch_end(self) -> None:
        self._log_contacts("test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """``{"ids", "embeddings": (B, D)}`` (+ ``"contacts"``: one ``(L, L)`` map per sequence)."""
        tokens = batch["tokens"]
        layer = self.hparams.embedding_layer % (self.model.num_layers + 1)
        out = self.model(tokens, repr_layers=[layer], return_contacts=self.hparams.predict_contacts)
        result = {
            "ids": batch.get("ids"),
            "embeddings": mean_over_residues(out["representations"][layer], tokens, self.alphabet),
        }
        if self.hparams.predict_contacts:
            lengths = residue_lengths(tokens, self.alphabet).tolist()
            result["contacts"] = [c[:n, :n] for c, n in zip(out["contacts"], lengths)]
        return result
