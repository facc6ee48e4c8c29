"""Fine-tuning ESM-2 for protein property prediction: per-sequence and per-residue heads, optional LoRA.

The backbone is any ``ESM2`` (a local fair-esm/HF checkpoint via ``pretrained``, or a published
size from scratch). It can be trained in full, frozen (``freeze_backbone``: only the head learns,
the usual "embeddings + probe" baseline) or adapted with LoRA through peft (``lora_rank > 0``):
low-rank updates on the attention ``q_proj``/``k_proj``/``v_proj``/``out_proj`` projections, the
rest of the backbone frozen. ``merged_backbone()`` folds the LoRA updates back into a plain
``ESM2`` that ``save_pretrained`` writes as a fair-esm file.

- ``ESM2SequencePredictor``: mean over residues (or ``<cls>``) of a chosen layer -> MLP head;
  ``sequence-classification`` (cross-entropy, accuracy and macro F1) or ``sequence-regression``
  (MSE; Pearson and Spearman correlation).
- ``ESM2ResiduePredictor``: the chosen layer at every residue -> MLP head; cross-entropy over
  residues (``-100`` labels ignored), accuracy and macro F1.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from torchmetrics.regression import MeanSquaredError, PearsonCorrCoef, SpearmanCorrCoef

from zoo.base import ZooModule
from zoo.optim import WarmupCosineLR
from zoo.protein.model import ESM2, ESM2Layer
from zoo.protein.module import IGNORE_INDEX, build_esm2, mean_over_residues

__all__ = ["LORA_TARGETS", "ESM2Finetuner", "ESM2ResiduePredictor", "ESM2SequencePredictor"]

#: the attention projections LoRA adapts (fair-esm's names)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _head(embed_dim: int, outputs: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Dropout(dropout),
        nn.Linear(embed_dim, embed_dim),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(embed_dim, outputs),
    )


class ESM2Finetuner(ZooModule):
    """Backbone loading, freezing and LoRA shared by the fine-tuning modules.

    Args:
        size / num_layers / embed_dim / attention_heads / pretrained: the backbone, as in
            ``ESM2MaskedLM`` (a checkpoint's architecture wins).
        representation_layer: the backbone layer the head reads (-1: the last, after its LayerNorm).
        freeze_backbone: train only the head.
        lora_rank: > 0 adds LoRA adapters of this rank (peft) and freezes the rest of the backbone.
        lora_alpha / lora_dropout: LoRA scaling (``alpha / rank``) and dropout on the adapter input.
        head_dropout: dropout before each layer of the head.
    """

    sharding_units = (ESM2Layer,)
    task: str

    def __init__(
        self,
        size: str = "t6_8M",
        num_layers: int | None = None,
        embed_dim: int | None = None,
        attention_heads: int | None = None,
        pretrained: str | None = None,
        representation_layer: int = -1,
        freeze_backbone: bool = False,
        lora_rank: int = 0,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        head_dropout: float = 0.1,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler)
        # collects this class's arguments and the subclass's (task, num_classes...) from the call frames
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {lora_rank}")
        if lora_rank and freeze_backbone:
            raise ValueError(
                "lora_rank > 0 already freezes the backbone; freeze_backbone=True leaves no adapter to train"
            )
        self.model = build_esm2(size, num_layers, embed_dim, attention_heads, pretrained)
        if not -self.model.num_layers - 1 <= representation_layer <= self.model.num_layers:
            raise ValueError(
                f"representation_layer={representation_layer} outside 0..{self.model.num_layers} (or -1)"
            )
        self.layer = representation_layer % (self.model.num_layers + 1)
        self.alphabet = self.model.alphabet
        # heads the task does not use (the LM head's own layers; its weight is the shared embedding)
        # are frozen, so that DDP does not wait for their gradients
        self.model.contact_head.requires_grad_(False)
        for module in (self.model.lm_head.dense, self.model.lm_head.layer_norm):
            module.requires_grad_(False)
        self.model.lm_head.bias.requires_grad_(False)
        if self.layer < self.model.num_layers:  # layers above the one read get no gradient either
            self.model.layers[self.layer :].requires_grad_(False)
            self.model.emb_layer_norm_after.requires_grad_(False)
        if freeze_backbone:
            self.model.requires_grad_(False)
        if lora_rank:
            self._add_lora(lora_rank, lora_alpha, lora_dropout)

    def _add_lora(self, rank: int, alpha: float, dropout: float) -> None:
        try:
            import peft
        except ImportError as error:
            raise ImportError("LoRA needs peft: pip install peft") from error
        config = peft.LoraConfig(
            r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(LORA_TARGETS)
        )
        peft.inject_adapter_in_model(config, self.model)  # freezes everything but the adapters

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, T, D)`` hidden states of ``representation_layer``."""
        return self.model(tokens, repr_layers=[self.layer])["representations"][self.layer]

    def merged_backbone(self) -> ESM2:
        """A copy of the backbone with LoRA updates merged into plain ``nn.Linear`` layers."""
        backbone = copy.deepcopy(self.model).cpu()
        for module in list(backbone.modules()):
            for name, child in list(module.named_children()):
                if hasattr(child, "merge") and hasattr(child, "get_base_layer"):
                    child.merge()
                    setattr(module, name, child.get_base_layer())
        return backbone.requires_grad_(True)

    def _check_data(self) -> None:
        """The data module's task must be this module's (a regression file fed to a classifier fails here)."""
        data = getattr(self.trainer, "datamodule", None)
        expected = getattr(data, "task", None)
        if expected is not None and expected != self.task:
            raise ValueError(
                f"{type(self).__name__} is configured for {self.task!r} but the data is {expected!r}"
            )

    def setup(self, stage: str) -> None:
        self._check_data()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test")


class ESM2SequencePredictor(ESM2Finetuner):
    """One class or value per protein from a pooled ESM-2 representation.

    Args:
        task: ``sequence-classification`` or ``sequence-regression`` (the data module's names).
        num_classes: classes (linked from the data module by the CLI); ignored for regression.
        pooling: ``mean`` over residues or the ``cls`` token.
        See ``ESM2Finetuner`` for the backbone, LoRA and head arguments.
    """

    def __init__(
        self,
        task: Literal["sequence-classification", "sequence-regression"] = "sequence-classification",
        num_classes: int = 2,
        pooling: Literal["mean", "cls"] = "mean",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if task not in ("sequence-classification", "sequence-regression"):
            raise ValueError(f"task must be 'sequence-classification' or 'sequence-regression', got {task!r}")
        if task == "sequence-classification" and num_classes < 2:
            raise ValueError(f"classification needs num_classes >= 2, got {num_classes}")
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.task = task
        self.head = _head(
            self.model.embed_dim,
            num_classes if task == "sequence-classification" else 1,
            self.hparams.head_dropout,
        )
        self.setup_metrics()

    def configure_metrics(self) -> MetricCollection:
        if self.hparams.task == "sequence-regression":
            return MetricCollection(
                {"mse": MeanSquaredError(), "pearson": PearsonCorrCoef(), "spearman": SpearmanCorrCoef()}
            )
        n = self.hparams.num_classes
        return MetricCollection(
            {"acc": MulticlassAccuracy(n, average="micro"), "f1": MulticlassF1Score(n, average="macro")}
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, C)`` class logits, or ``(B,)`` values for regression."""
        hidden = self.features(tokens)
        pooled = (
            hidden[:, 0]
            if self.hparams.pooling == "cls"
            else mean_over_residues(hidden, tokens, self.alphabet)
        )
        out = self.head(pooled)
        return out.squeeze(-1) if self.hparams.task == "sequence-regression" else out

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        out, labels = self(batch["tokens"]), batch["labels"]
        if self.hparams.task == "sequence-regression":
            loss = F.mse_loss(out.float(), labels.float())
        else:
            loss = F.cross_entropy(out.float(), labels)
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(labels))
        self.update_metrics(stage, out.detach().float(), labels)
        return loss

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """``{"ids", "predictions"}``: class probabilities (B, C) or values (B,)."""
        out = self(batch["tokens"])
        return {
            "ids": batch.get("ids"),
            "predictions": out if self.hparams.task == "sequence-regression" else out.softmax(-1),
        }


class ESM2ResiduePredictor(ESM2Finetuner):
    """One class per residue (secondary structure, binding sites, membrane segments...).

    Args:
        num_classes: classes (linked from the data module by the CLI).
        See ``ESM2Finetuner`` for the backbone, LoRA and head arguments.
    """

    def __init__(self, num_classes: int = 2, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.task = "residue-classification"
        self.head = _head(self.model.embed_dim, num_classes, self.hparams.head_dropout)
        self.setup_metrics()

    def configure_metrics(self) -> MetricCollection:
        n = self.hparams.num_classes
        return MetricCollection(
            {
                "acc": MulticlassAccuracy(n, average="micro", ignore_index=IGNORE_INDEX),
                "f1": MulticlassF1Score(n, average="macro", ignore_index=IGNORE_INDEX),
            }
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, T, C)`` per-token class logits (``<cls>``/``<eos>``/pads included; their labels are -100)."""
        return self.head(self.features(tokens))

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        logits, labels = self(batch["tokens"]), batch["labels"]
        flat_logits, flat_labels = logits.flatten(0, 1).float(), labels.flatten()
        loss = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX)
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(labels))
        self.update_metrics(stage, flat_logits.detach(), flat_labels)
        return loss

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """``{"ids", "predictions"}``: per sequence, an ``(L, C)`` tensor of residue class probabilities."""
        tokens = batch["tokens"]
        probs = self(tokens).softmax(-1)
        lengths = tokens.ne(self.alphabet.padding_idx).sum(1) - 2
        return {
            "ids": batch.get("ids"),
            "predictions": [p[1 : n + 1] for p, n in zip(probs, lengths.tolist())],
        }
