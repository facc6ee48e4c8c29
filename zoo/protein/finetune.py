"""Fine-tuning ESM-2 for protein property prediction: per-sequence and per-residue heads, optional LoRA.

The backbone is any ``ESM2`` (a local fair-esm/HF checkpoint via ``pretrained``, or a published
preset ``model_name`` with ``model_kwargs`` overrides, from scratch). It can be trained in full, frozen
(``freeze_backbone``: only the head learns, the usual "embeddings + probe" baseline) or adapted with LoRA
through peft (``lora: {rank: 8}``): low-rank updates on the attention ``q_proj``/``k_proj``/``v_proj``/
``out_proj`` projections, the rest of the backbone frozen. ``merged_backbone()`` folds the LoRA updates
back into a plain ``ESM2`` that ``save_pretrained`` writes as a fair-esm file.

- ``ESM2SequencePredictor``: mean over residues (or ``<cls>``) of a chosen layer -> MLP head;
  ``sequence-classification`` (cross-entropy, accuracy and macro F1) or ``sequence-regression``
  (MSE; Pearson and Spearman correlation).
- ``ESM2ResiduePredictor``: the chosen layer at every residue -> MLP head; cross-entropy over
  residues (``-100`` labels ignored), accuracy and macro F1.

Predictions are records named by class (``class_names``, linked from ``ProteinLabelDataModule``), in the
form the training labels take: a class name or a value per protein, a string of one class character
per residue.
"""

from __future__ import annotations

import copy
import string
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from torchmetrics.regression import MeanSquaredError, PearsonCorrCoef, SpearmanCorrCoef

from zoo.base import IGNORE_INDEX, ZooModule
from zoo.errors import ZooError
from zoo.lora import LoRAConfig
from zoo.optim import WarmupCosineLR
from zoo.parts import plain_part, resolve_part
from zoo.protein.backbone import build_esm2, example_tokens, mean_over_residues, residue_lengths
from zoo.protein.checkpoints import OldSizeArguments
from zoo.protein.model import ESM2, ESM2Layer

__all__ = ["LORA_TARGETS", "ESM2Finetuner", "ESM2ResiduePredictor", "ESM2SequencePredictor"]

#: the attention projections LoRA adapts (fair-esm's names)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
SEQUENCE_TASKS = ("sequence-classification", "sequence-regression")
#: residue class names when none are given: the predicted label strings need one character per class
DEFAULT_RESIDUE_CLASSES = string.digits + string.ascii_lowercase + string.ascii_uppercase


def _head(embed_dim: int, outputs: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Dropout(dropout),
        nn.Linear(embed_dim, embed_dim),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(embed_dim, outputs),
    )


def _check_class_names(class_names: list[str] | None, num_classes: int) -> None:
    if class_names and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names {class_names} for num_classes={num_classes}")


class ESM2Finetuner(OldSizeArguments, ZooModule):
    """Backbone loading, freezing and LoRA shared by the fine-tuning modules.

    Args:
        model_name / model_kwargs / pretrained: the backbone, as in ``ESM2MaskedLM`` (a checkpoint's
            architecture wins).
        representation_layer: the backbone layer the head reads (-1: the last, after its LayerNorm).
        freeze_backbone: train only the head.
        lora: a ``zoo.lora.LoRAConfig`` (``lora: {rank: 8, alpha: 16}`` in YAML) adds LoRA adapters (peft) on the
            attention projections and freezes the rest of the backbone; ``None`` trains the backbone.
        head_dropout: dropout before each layer of the head.
        compile: ``torch.compile`` the network (``self.model``) when a trainer sets the module up: ``true``, or a
            dict of ``torch.compile`` options (``mode``, ``fullgraph``, ``dynamic``, ``backend``, ``options``);
            checkpoints are the same as without it (``ZooModule.compile_network``).
    """

    sharding_units = (ESM2Layer,)
    #: the data module's ``task`` this module learns (checked when a trainer starts)
    task: ClassVar[str]

    def __init__(
        self,
        model_name: str = "esm2_t6_8M",
        model_kwargs: dict | None = None,
        pretrained: str | None = None,
        representation_layer: int = -1,
        freeze_backbone: bool = False,
        lora: LoRAConfig | None = None,
        head_dropout: float = 0.1,
        compile: bool | dict = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
    ) -> None:
        lora = plain_part(lora, LoRAConfig)  # saved as plain data: checkpoints load with weights_only
        if lora is not None and freeze_backbone:
            raise ZooError(
                "a LoRA adapter already freezes the backbone; freeze_backbone=True leaves none to train"
            )
        # the base saves this class's arguments and the subclass's (task, num_classes...) from the call frames
        super().__init__(optimizer, lr_scheduler)

    def configure_models(self) -> None:
        hp = self.hparams
        self.model = build_esm2(hp.model_name, hp.model_kwargs, hp.pretrained)
        layers = self.model.num_layers
        if not -layers - 1 <= hp.representation_layer <= layers:
            raise ValueError(f"representation_layer={hp.representation_layer} outside 0..{layers} (or -1)")
        self.layer = hp.representation_layer % (layers + 1)
        self.alphabet = self.model.alphabet
        # heads the task does not use (the LM head's own layers; its weight is the shared embedding)
        # are frozen, so that DDP does not wait for their gradients
        self.model.contact_head.requires_grad_(False)
        for module in (self.model.lm_head.dense, self.model.lm_head.layer_norm):
            module.requires_grad_(False)
        self.model.lm_head.bias.requires_grad_(False)
        if self.layer < layers:  # layers above the one read get no gradient either
            self.model.layers[self.layer :].requires_grad_(False)
            self.model.emb_layer_norm_after.requires_grad_(False)
        if hp.freeze_backbone:
            self.model.requires_grad_(False)
        if hp.lora is not None:
            from peft import inject_adapter_in_model

            config = resolve_part(hp.lora, LoRAConfig).to_peft(LORA_TARGETS)
            inject_adapter_in_model(config, self.model)  # freezes everything but the adapters

    def example_inputs(self, batch_size: int = 2) -> tuple[torch.Tensor]:
        return (example_tokens(self.alphabet, batch_size, self.device),)

    def export_graphs(self) -> list:
        """``forward`` with a dynamic batch and sequence length, traced and checked on padded batches (the
        default graph would fix the length of ``example_inputs``)."""
        from zoo.protein.export import tokens_graph

        return [tokens_graph("model", self, self.alphabet, ("output",), self.device)]

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
        class_names: class names in label order for the predict records (linked from the data module);
            ``"0"``, ``"1"``... when not given.
        pooling: ``mean`` over residues or the ``cls`` token.
        See ``ESM2Finetuner`` for the backbone, LoRA and head arguments.
    """

    def __init__(
        self,
        task: Literal["sequence-classification", "sequence-regression"] = "sequence-classification",
        num_classes: int = 2,
        class_names: list[str] | None = None,
        pooling: Literal["mean", "cls"] = "mean",
        **kwargs,
    ) -> None:
        if task not in SEQUENCE_TASKS:
            raise ValueError(f"task must be 'sequence-classification' or 'sequence-regression', got {task!r}")
        if task == "sequence-classification":
            if num_classes < 2:
                raise ValueError(f"classification needs num_classes >= 2, got {num_classes}")
            _check_class_names(class_names, num_classes)
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        super().__init__(**kwargs)

    @property
    def task(self) -> str:
        return self.hparams.task

    @property
    def regression(self) -> bool:
        return self.hparams.task == "sequence-regression"

    def configure_models(self) -> None:
        super().configure_models()
        outputs = 1 if self.regression else self.hparams.num_classes
        self.head = _head(self.model.embed_dim, outputs, self.hparams.head_dropout)

    def configure_metrics(self) -> MetricCollection:
        if self.regression:
            return MetricCollection(
                {"mse": MeanSquaredError(), "pearson": PearsonCorrCoef(), "spearman": SpearmanCorrCoef()}
            )
        n = self.hparams.num_classes
        return MetricCollection(
            {"acc": MulticlassAccuracy(n, average="micro"), "f1": MulticlassF1Score(n, average="macro")}
        )

    @property
    def label_names(self) -> list[str]:
        """The predicted labels: ``class_names``, else the class indices as text."""
        return self.hparams.class_names or [str(i) for i in range(self.hparams.num_classes)]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, C)`` class logits, or ``(B,)`` values for regression."""
        hidden = self.features(tokens)
        pooled = (
            hidden[:, 0]
            if self.hparams.pooling == "cls"
            else mean_over_residues(hidden, tokens, self.alphabet)
        )
        out = self.head(pooled)
        return out.squeeze(-1) if self.regression else out

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        out, labels = self(batch["tokens"]), batch["labels"]
        if self.regression:
            loss = F.mse_loss(out.float(), labels.float())
        else:
            loss = F.cross_entropy(out.float(), labels)
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(labels))
        self.update_metrics(stage, out.detach().float(), labels)
        return loss

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """One record per protein: ``{"id": FASTA id, "label": value}`` for regression, else
        ``{"id", "label": the most probable class name, "probabilities": {class name: probability}}``."""
        out = self(batch["tokens"]).float()
        if self.regression:
            return [{"id": record_id, "label": value} for record_id, value in zip(batch["ids"], out.tolist())]
        names = self.label_names
        probabilities = out.softmax(-1)
        return [
            {"id": record_id, "label": names[best], "probabilities": dict(zip(names, row))}
            for record_id, row, best in zip(
                batch["ids"], probabilities.tolist(), probabilities.argmax(-1).tolist()
            )
        ]


class ESM2ResiduePredictor(ESM2Finetuner):
    """One class per residue (secondary structure, binding sites, membrane segments...).

    Args:
        num_classes: classes (linked from the data module by the CLI).
        class_names: one character per class, in label order, for the predicted label strings (linked from
            the data module); ``0-9``, then ``a-z``, then ``A-Z`` when not given.
        See ``ESM2Finetuner`` for the backbone, LoRA and head arguments.
    """

    task = "residue-classification"

    def __init__(self, num_classes: int = 2, class_names: list[str] | None = None, **kwargs) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        _check_class_names(class_names, num_classes)
        if class_names and any(len(name) != 1 for name in class_names):
            raise ValueError(f"per-residue class names must be single characters, got {class_names}")
        if not class_names and num_classes > len(DEFAULT_RESIDUE_CLASSES):
            raise ValueError(f"{num_classes} classes need their one-character names: pass class_names=[...]")
        super().__init__(**kwargs)

    def configure_models(self) -> None:
        super().configure_models()
        self.head = _head(self.model.embed_dim, self.hparams.num_classes, self.hparams.head_dropout)

    def configure_metrics(self) -> MetricCollection:
        n = self.hparams.num_classes
        return MetricCollection(
            {
                "acc": MulticlassAccuracy(n, average="micro", ignore_index=IGNORE_INDEX),
                "f1": MulticlassF1Score(n, average="macro", ignore_index=IGNORE_INDEX),
            }
        )

    @property
    def label_names(self) -> str:
        """One character per class, as the predicted label strings spell them."""
        return "".join(self.hparams.class_names or DEFAULT_RESIDUE_CLASSES[: self.hparams.num_classes])

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

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """One record per protein: ``{"id": FASTA id, "label": one class character per residue,
        "probabilities": (L, C) tensor of residue class probabilities}`` (L residues)."""
        tokens = batch["tokens"]
        probabilities = self(tokens).float().softmax(-1)
        names = self.label_names
        records = []
        for record_id, row, n in zip(
            batch["ids"], probabilities, residue_lengths(tokens, self.alphabet).tolist()
        ):
            residues = row[1 : n + 1]
            label = "".join(names[c] for c in residues.argmax(-1).tolist())
            records.append({"id": record_id, "label": label, "probabilities": residues})
        return records
