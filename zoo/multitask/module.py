"""``MultitaskModule``: trains a ``MultitaskTransformer`` on ``{task: batch}`` steps with a task weighting.

Per step, each task present in the batch contributes its loss (cross-entropy, token
cross-entropy ignoring padding, mean-squared error, teacher-forced next-token cross-entropy); the
``TaskWeighting`` chosen in YAML turns them into one loss. Logged per task:
``<stage>/<task>/loss``, ``train/<task>/weight``, and metrics (``acc``, ``token_acc``, ``mae``,
``exact_match`` of greedy or beam decoding in validation/test). ``val/score`` averages the
non-regression tasks' headline metrics, for checkpointing. Epoch-averaged training losses
(reduced across ranks) feed the history-based weightings (DWA, loss trend).
"""

from __future__ import annotations

from dataclasses import asdict

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MeanAbsoluteError, MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from zoo.base import ZooModule
from zoo.multitask.decoding import beam_search, greedy_search
from zoo.multitask.layers import DecoderLayer, EncoderLayer
from zoo.multitask.model import MultitaskTransformer
from zoo.multitask.tasks import (
    GENERATION,
    REGRESSION,
    SEQUENCE_CLASSIFICATION,
    TOKEN_CLASSIFICATION,
    TaskSpec,
    validate_tasks,
)
from zoo.multitask.vocab import BOS_ID, EOS_ID, PAD_ID
from zoo.multitask.weighting import StaticWeighting, TaskWeighting
from zoo.optim import WarmupCosineLR, weight_decay_groups

__all__ = ["MultitaskModule", "sequences_match"]

IGNORE_INDEX = -100
HEADLINE = {SEQUENCE_CLASSIFICATION: "acc", TOKEN_CLASSIFICATION: "token_acc", GENERATION: "exact_match"}


def sequences_match(generated: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row: do the two id sequences agree up to and including their first ``<eos>``?"""

    def normalise(ids: torch.Tensor, width: int) -> torch.Tensor:
        ids = F.pad(ids, (0, width - ids.shape[1]), value=PAD_ID)
        after_eos = (ids == EOS_ID).long().cumsum(1) - (ids == EOS_ID).long() > 0
        return ids.masked_fill(after_eos, PAD_ID)

    width = max(generated.shape[1], target.shape[1])
    return (normalise(generated, width) == normalise(target, width)).all(1)


class MultitaskModule(ZooModule):
    """A shared-encoder multitask Transformer with per-task heads and adaptive task weighting.

    Args:
        vocab_size / tasks: linked from the data module (``zoo fit``); tasks are ``TaskSpec``s.
        d_model ... decoder_layers: see ``zoo.multitask.MultitaskTransformer``.
        weighting: a ``zoo.multitask.weighting`` method (``class_path: GradNorm`` ...); static by default.
        num_beams: beams for validation/test generation (1 = greedy).
    """

    sharding_units = (EncoderLayer, DecoderLayer)

    def __init__(
        self,
        vocab_size: int,
        tasks: list[TaskSpec],
        d_model: int = 128,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        ffn_dim: int | None = None,
        num_layers: int = 3,
        sharing: str = "partial",
        task_layers: int | None = None,
        adapter_dim: int = 32,
        positions: str = "rotary",
        decoder_layers: int = 2,
        dropout: float = 0.0,
        weighting: TaskWeighting | None = None,
        num_beams: int = 1,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "weighting", "tasks"])
        tasks = validate_tasks(tasks)
        # plain dicts: checkpoints then load with torch.load(weights_only=True)
        self.hparams["tasks"] = [asdict(t) for t in tasks]
        self.model = MultitaskTransformer(
            vocab_size,
            tasks,
            d_model=d_model,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            ffn_dim=ffn_dim,
            num_layers=num_layers,
            sharing=sharing,
            task_layers=task_layers,
            adapter_dim=adapter_dim,
            positions=positions,
            decoder_layers=decoder_layers,
            dropout=dropout,
        )
        self.tasks = self.model.tasks
        self.weighting = weighting if weighting is not None else StaticWeighting()
        self.weighting.bind(list(self.tasks.values()))
        self.num_beams = num_beams
        n = len(self.tasks)
        self.register_buffer("epoch_loss_sum", torch.zeros(n), persistent=True)
        self.register_buffer("epoch_loss_count", torch.zeros(n), persistent=True)
        self.exact_match = nn.ModuleDict()
        for stage in ("train", "val", "test"):
            for name, spec in self.tasks.items():
                self.metrics[f"{stage}_{name}"] = self._task_metrics(spec).clone(prefix=f"{stage}/{name}/")
                if spec.type == GENERATION and stage != "train":
                    self.exact_match[f"{stage}_{name}"] = MeanMetric()

    def _task_metrics(self, spec: TaskSpec) -> MetricCollection:
        if spec.type == SEQUENCE_CLASSIFICATION:
            return MetricCollection({"acc": MulticlassAccuracy(spec.num_classes, average="micro")})
        if spec.type == TOKEN_CLASSIFICATION:
            return MetricCollection(
                {
                    "token_acc": MulticlassAccuracy(
                        spec.num_classes, average="micro", ignore_index=IGNORE_INDEX
                    )
                }
            )
        if spec.type == REGRESSION:
            return MetricCollection({"mae": MeanAbsoluteError()})
        return MetricCollection(
            {
                "token_acc": MulticlassAccuracy(
                    self.model.vocab_size, average="micro", ignore_index=IGNORE_INDEX
                )
            }
        )

    # ------------------------------------------------------------------ model
    def forward(self, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        """The task's prediction the loss is computed on (logits or regression values)."""
        decoder_inputs = None
        if self.tasks[task].type == GENERATION:
            targets = batch["target_ids"]
            bos = torch.full_like(targets[:, :1], BOS_ID)
            decoder_inputs = torch.cat([bos, targets[:, :-1]], dim=1)
        return self.model(batch["input_ids"], batch["padding_mask"], task, decoder_inputs)

    def generate(
        self,
        task: str,
        input_ids: torch.Tensor,
        padding_mask: torch.Tensor | None,
        num_beams: int | None = None,
    ) -> torch.Tensor:
        """Decoded ids for a generation task (greedy for one beam), ``<bos>`` excluded."""
        beams = num_beams or self.num_beams
        length = self.tasks[task].max_target_length
        if beams == 1:
            return greedy_search(self.model, task, input_ids, padding_mask, length)
        return beam_search(self.model, task, input_ids, padding_mask, length, beams)[0]

    def _loss(
        self, task: str, batch: dict, output: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, metric predictions, metric targets)``."""
        kind = self.tasks[task].type
        if kind == REGRESSION:
            output = output.float()
            return F.mse_loss(output, batch["labels"]), output.detach(), batch["labels"]
        labels = (
            batch["labels"]
            if kind != GENERATION
            else batch["target_ids"].masked_fill(batch["target_ids"] == PAD_ID, IGNORE_INDEX)
        )
        logits = output.float()
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX
        )
        return loss, logits.detach().reshape(-1, logits.shape[-1]), labels.reshape(-1)

    def _task_step(self, stage: str, task: str, batch: dict) -> torch.Tensor:
        output = self(batch, task)
        loss, preds, target = self._loss(task, batch, output)
        size = batch["input_ids"].shape[0]
        self.log(
            f"{stage}/{task}/loss",
            loss.detach(),
            on_step=stage == "train",
            on_epoch=True,
            sync_dist=True,
            batch_size=size,
        )
        collection = self.metrics[f"{stage}_{task}"]
        collection.update(preds, target)
        self.log_dict(collection, on_step=False, on_epoch=True, sync_dist=True, batch_size=size)
        if f"{stage}_{task}" in self.exact_match:
            generated = self.generate(task, batch["input_ids"], batch["padding_mask"])
            metric = self.exact_match[f"{stage}_{task}"]
            metric.update(sequences_match(generated, batch["target_ids"]).float())
            self.log(
                f"{stage}/{task}/exact_match",
                metric,
                on_step=False,
                on_epoch=True,
                sync_dist=True,
                batch_size=size,
            )
        return loss

    # --------------------------------------------------------------- training
    def training_step(self, batch: dict[str, dict | None], batch_idx: int) -> torch.Tensor:
        losses = {task: self._task_step("train", task, b) for task, b in batch.items() if b is not None}
        if not losses:
            raise ValueError("a training step received no task batch")
        total = self.weighting(losses, self.model.last_shared_parameter())
        with torch.no_grad():
            for task, loss in losses.items():
                i = list(self.tasks).index(task)
                self.epoch_loss_sum[i] += loss.detach().float()
                self.epoch_loss_count[i] += 1
        weights = self.weighting.weights()
        self.log_dict(
            {f"train/{t}/weight": w for t, w in weights.items()},
            on_step=True,
            on_epoch=False,
            sync_dist=False,
        )
        self.log("train/loss", total.detach(), prog_bar=True, on_step=True, on_epoch=True, sync_dist=True)
        return total

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.weighting.after_optimizer_step()

    def on_train_epoch_end(self) -> None:
        sums = self.trainer.strategy.reduce(self.epoch_loss_sum.clone(), reduce_op="sum")
        counts = self.trainer.strategy.reduce(self.epoch_loss_count.clone(), reduce_op="sum")
        means = {t: float(sums[i] / counts[i]) for i, t in enumerate(self.tasks) if counts[i] > 0}
        self.weighting.epoch_end(means)
        self.epoch_loss_sum.zero_()
        self.epoch_loss_count.zero_()

    # -------------------------------------------------------------- evaluation
    def _eval_step(self, stage: str, batch: dict[str, dict]) -> None:
        for task, b in batch.items():
            if b is not None:
                self._task_step(stage, task, b)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _log_score(self, stage: str) -> None:
        values = []
        for name, spec in self.tasks.items():
            metric = HEADLINE.get(spec.type)
            if metric is None:
                continue
            source = self.exact_match if metric == "exact_match" else self.metrics[f"{stage}_{name}"]
            key = f"{stage}_{name}" if metric == "exact_match" else metric
            if key in source and getattr(source[key], "update_count", 1):
                values.append(source[key].compute())
        if values:
            self.log(
                f"{stage}/score",
                torch.stack([torch.as_tensor(v).float() for v in values]).mean(),
                sync_dist=False,
            )

    def on_validation_epoch_end(self) -> None:
        self._log_score("val")

    def on_test_epoch_end(self) -> None:
        self._log_score("test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Per task: class ids, tag ids, values, or generated ids."""
        out = {}
        for task, b in batch.items():
            kind = self.tasks[task].type
            if kind == GENERATION:
                out[task] = self.generate(task, b["input_ids"], b["padding_mask"])
            elif kind == REGRESSION:
                out[task] = self(b, task)
            else:
                out[task] = self(b, task).argmax(-1)
        return out

    # --------------------------------------------------------------- optimizer
    def parameter_groups(self) -> list[dict]:
        """The model's decay / no-decay groups plus the weighting's own parameters (no decay, own LR)."""
        groups = weight_decay_groups(self.model)
        extra = self.weighting.parameter_group()
        return [*groups, extra] if extra else groups
