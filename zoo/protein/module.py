"""``ESM2MaskedLM``: ESM-2 masked-language-model training (from scratch or from a checkpoint).

Masking follows ESM-2/BERT: 15% of residues (never ``<cls>``/``<eos>``/``<pad>``) are chosen;
80% become ``<mask>``, 10% a random amino acid, 10% stay. The loss is cross-entropy on the
chosen positions only, and perplexity is ``exp`` of that loss over all masked tokens of an
epoch. Validation masks with a generator seeded by the batch index, so its perplexity is
comparable from epoch to epoch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MetricCollection
from torchmetrics.text import Perplexity

from zoo.base import ZooModule
from zoo.optim import WarmupCosineLR
from zoo.protein.alphabet import Alphabet
from zoo.protein.model import ESM2, ESM2_CONFIGS, ESM2Layer

__all__ = ["ESM2MaskedLM", "mask_tokens"]

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


class ESM2MaskedLM(ZooModule):
    """ESM-2 trained by masked language modelling.

    Args:
        size: a published architecture (``t6_8M`` ... ``t48_15B``), overridable field by field
            with ``num_layers`` / ``embed_dim`` / ``attention_heads`` (e.g. tiny test models).
        pretrained: a local checkpoint for ``ESM2.from_pretrained`` (fair-esm ``.pt`` or a HF
            ``EsmForMaskedLM`` directory); its architecture wins over ``size``.
        mask_prob: share of residues chosen for the loss (15% in ESM-2).
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
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if not 0 < mask_prob < 1:
            raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
        if pretrained is not None:
            self.model = ESM2.from_pretrained(pretrained)
        else:
            if size not in ESM2_CONFIGS:
                raise ValueError(f"unknown ESM-2 size {size!r}; known: {', '.join(ESM2_CONFIGS)}")
            base = ESM2_CONFIGS[size]
            self.model = ESM2(
                num_layers if num_layers is not None else base.num_layers,
                embed_dim if embed_dim is not None else base.embed_dim,
                attention_heads if attention_heads is not None else base.attention_heads,
            )
        self.alphabet = self.model.alphabet
        self.setup_metrics()

    def configure_metrics(self) -> MetricCollection:
        return MetricCollection({"perplexity": Perplexity(ignore_index=IGNORE_INDEX)})

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
        return self._step(batch, "val", torch.Generator().manual_seed(batch_idx))

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test", torch.Generator().manual_seed(batch_idx))

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Per-sequence embeddings: the last layer averaged over residues (``<cls>``/``<eos>``/pads excluded)."""
        tokens = batch["tokens"]
        layer = self.model.num_layers
        hidden = self.model(tokens, repr_layers=[layer])["representations"][layer]
        residues = ~torch.isin(
            tokens,
            torch.tensor(
                [self.alphabet.cls_idx, self.alphabet.eos_idx, self.alphabet.padding_idx],
                device=tokens.device,
            ),
        )
        weights = residues.unsqueeze(-1).to(hidden)
        embeddings = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        return {"ids": batch.get("ids"), "embeddings": embeddings}
