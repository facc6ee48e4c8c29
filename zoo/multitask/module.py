"""``MultitaskModule``: trains a ``MultitaskTransformer`` on ``{task: batch}`` steps with a task weighting.

Per step, each task present in the batch contributes its loss (cross-entropy, token
cross-entropy ignoring padding, mean-squared error, teacher-forced next-token cross-entropy); the
``TaskWeighting`` chosen in YAML turns them into one loss. Logged per task: ``<stage>/<task>/loss``,
``train/<task>/weight``, and epoch metrics through the base's metric groups (one group per task:
``acc``, ``token_acc``, ``mae``; one more per generation task for the ``exact_match`` of greedy or beam
decoding in validation/test). ``val/score`` averages the non-regression tasks' headline metrics, for
checkpointing. Epoch-averaged training losses (reduced across ranks) feed the history-based weightings
(DWA, loss trend).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MeanAbsoluteError, MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from zoo.base import IGNORE_INDEX, ZooModule
from zoo.multitask.arithmetic import ARITHMETIC_TASKS, ARITHMETIC_VOCAB_SIZE, DEFAULT_TASKS
from zoo.multitask.decoding import beam_search, greedy_search
from zoo.multitask.layers import DecoderLayer, EncoderLayer
from zoo.multitask.model import MultitaskTransformer, preset_arguments
from zoo.multitask.tasks import (
    GENERATION,
    REGRESSION,
    SEQUENCE_CLASSIFICATION,
    TOKEN_CLASSIFICATION,
    TaskSpec,
    validate_tasks,
)
from zoo.multitask.upgrade import upgrade_architecture_arguments
from zoo.multitask.vocab import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, TOKENIZERS, Vocabulary
from zoo.multitask.weighting import StaticWeighting, TaskWeighting, weighting_from_config
from zoo.optim import WarmupCosineLR, weight_decay_groups

__all__ = ["MultitaskModule", "sequences_match"]

HEADLINE = {SEQUENCE_CLASSIFICATION: "acc", TOKEN_CLASSIFICATION: "token_acc", GENERATION: "exact_match"}
#: the checkpoint entry recording the weighting (a live object, so not among the hyper-parameters)
WEIGHTING_KEY = "task_weighting"


def sequences_match(generated: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row: do the two id sequences agree up to and including their first ``<eos>``?"""

    def normalise(ids: torch.Tensor, width: int) -> torch.Tensor:
        ids = F.pad(ids, (0, width - ids.shape[1]), value=PAD_ID)
        after_eos = (ids == EOS_ID).long().cumsum(1) - (ids == EOS_ID).long() > 0
        return ids.masked_fill(after_eos, PAD_ID)

    width = max(generated.shape[1], target.shape[1])
    return (normalise(generated, width) == normalise(target, width)).all(1)


def teacher_forcing_inputs(target_ids: torch.Tensor) -> torch.Tensor:
    """The decoder's inputs for a target: ``<bos>`` then the target shifted right by one."""
    bos = torch.full_like(target_ids[:, :1], BOS_ID)
    return torch.cat([bos, target_ids[:, :-1]], dim=1)


def generated_group(task: str) -> str:
    """The metric group of a generation task's decoded outputs (its exact match)."""
    return f"{task}_generated"


class MultitaskModule(ZooModule):
    """A shared-encoder multitask Transformer with per-task heads and adaptive task weighting.

    Args:
        vocab_size / tasks: linked from the data module (``zoo fit``); tasks are ``TaskSpec``s. The defaults
            are the embedded arithmetic data's (``zoo.multitask.arithmetic``): its vocabulary size, and
            ``None`` for its wellformed / roles / value tasks.
        model_name: an architecture of ``zoo.multitask.model.PRESETS`` (``multitask_small``: 3 shared layers,
            d=128, 4 heads, one private layer per task, a 2-layer decoder per generation task).
        model_kwargs: overrides of the preset's ``MultitaskTransformer`` arguments (``d_model``,
            ``num_heads``, ``num_kv_heads``, ``ffn_dim``, ``num_layers``, ``sharing``, ``task_layers``,
            ``adapter_dim``, ``positions``, ``decoder_layers``, ``dropout``).
        weighting: a ``zoo.multitask.weighting`` method (``class_path: GradNorm`` ...); static by default.
            A live object, not a hyper-parameter: checkpoints record it apart (with its state), and
            ``load_from_checkpoint`` builds it again.
        num_beams: beams for validation/test/predict generation (1 = greedy).
        vocab_tokens / tokenizer: the vocabulary's tokens by id and how texts were split (linked from the
            data); predictions decode generated ids with them (ids are reported without them).
        compile: ``torch.compile`` the network (``self.model``) when a trainer sets the module up: ``true``, or a
            dict of ``torch.compile`` options (``mode``, ``fullgraph``, ``dynamic``, ``backend``, ``options``);
            checkpoints are the same as without it (``ZooModule.compile_network``).
    """

    sharding_units = (EncoderLayer, DecoderLayer)
    hparams_ignore = ("weighting",)
    progress_bar_metrics = ("val/score",)

    @classmethod
    def upgrade_hyperparameters(cls, hparams: dict) -> dict:
        """Architecture arguments of earlier versions (``d_model`` ...) -> ``model_name`` / ``model_kwargs``."""
        return super().upgrade_hyperparameters(upgrade_architecture_arguments(hparams))

    def __init__(
        self,
        vocab_size: int = ARITHMETIC_VOCAB_SIZE,
        tasks: list[TaskSpec] | None = None,
        model_name: str = "multitask_small",
        model_kwargs: dict[str, Any] | None = None,
        weighting: TaskWeighting | None = None,
        num_beams: int = 1,
        vocab_tokens: list[str] | None = None,
        tokenizer: str = "char",
        compile: bool | dict = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
    ) -> None:
        # checks that need no model: a bad preset, task list or vocabulary fails before anything is built
        preset_arguments(model_name, model_kwargs)
        specs = validate_tasks(tasks) if tasks is not None else [ARITHMETIC_TASKS[n] for n in DEFAULT_TASKS]
        _check_metric_groups(specs)
        _check_vocabulary(vocab_size, vocab_tokens, tokenizer)
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")
        # the base saves this frame's arguments: plain dicts let checkpoints load with weights_only=True
        tasks = [asdict(spec) for spec in specs]
        super().__init__(optimizer, lr_scheduler)
        # the weighting is the caller's object, not built from hyper-parameters: attached once the hooks ran
        self.weighting = weighting if weighting is not None else StaticWeighting()
        self.weighting.bind(list(self.tasks.values()))

    # ------------------------------------------------------------------ hooks
    def configure_models(self) -> None:
        hp = self.hparams
        self.model = MultitaskTransformer.from_preset(
            hp.model_name, hp.vocab_size, validate_tasks(hp.tasks), **(hp.model_kwargs or {})
        )
        self.tasks = self.model.tasks
        self.vocabulary = Vocabulary(hp.vocab_tokens, hp.tokenizer) if hp.vocab_tokens is not None else None

    def configure_losses(self) -> None:
        """Running sums of each task's training loss over the epoch (what DWA and the loss trend read)."""
        n = len(self.tasks)
        self.register_buffer("epoch_loss_sum", torch.zeros(n), persistent=True)
        self.register_buffer("epoch_loss_count", torch.zeros(n), persistent=True)

    def configure_metrics(self) -> dict[str, MetricCollection]:
        """One group per task (``<stage>/<task>/...``), one more per generation task for its exact match."""
        groups = {}
        for name, spec in self.tasks.items():
            groups[name] = MetricCollection(self._task_metrics(spec), prefix=f"{name}/")
            if spec.type == GENERATION:  # updated in validation and test only: decoding is costly
                groups[generated_group(name)] = MetricCollection(
                    {"exact_match": MeanMetric()}, prefix=f"{name}/"
                )
        return groups

    def _task_metrics(self, spec: TaskSpec) -> dict:
        if spec.type == SEQUENCE_CLASSIFICATION:
            return {"acc": MulticlassAccuracy(spec.num_classes, average="micro")}
        if spec.type == TOKEN_CLASSIFICATION:
            return {
                "token_acc": MulticlassAccuracy(spec.num_classes, average="micro", ignore_index=IGNORE_INDEX)
            }
        if spec.type == REGRESSION:
            return {"mae": MeanAbsoluteError()}
        vocab_size = self.model.vocab_size
        return {"token_acc": MulticlassAccuracy(vocab_size, average="micro", ignore_index=IGNORE_INDEX)}

    def summarize_metrics(self, stage: str, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``<stage>/score`` in validation and test: the mean of the non-regression tasks' headlines."""
        if stage == "train":
            return values
        keys = [
            f"{stage}/{name}/{HEADLINE[spec.type]}"
            for name, spec in self.tasks.items()
            if spec.type in HEADLINE
        ]
        headline = [values[key].float() for key in keys if key in values]
        if not headline:
            return values
        return {**values, f"{stage}/score": torch.stack(headline).mean()}

    def example_inputs(self, batch_size: int = 2) -> tuple:
        """``(input_ids, padding_mask, task)`` for the first declared task (plus ``decoder_inputs`` when it
        generates): rows of 8 random tokens, the last row padded after 5 (when there are several)."""
        task, spec = next(iter(self.tasks.items()))
        generator = torch.Generator().manual_seed(0)
        input_ids = torch.randint(
            len(SPECIAL_TOKENS), self.hparams.vocab_size, (batch_size, 8), generator=generator
        )
        padding_mask = torch.ones_like(input_ids, dtype=torch.bool)
        if batch_size > 1:
            padding_mask[-1, 5:] = False
        input_ids = input_ids.masked_fill(~padding_mask, PAD_ID).to(self.device)
        inputs = (input_ids, padding_mask.to(self.device), task)
        if spec.type != GENERATION:
            return inputs
        return (*inputs, teacher_forcing_inputs(input_ids[:, :4]))

    def export_graphs(self) -> list:
        """What ``zoo export --format pt2|onnx`` writes (``zoo.multitask.graphs``): ``<task>`` for each
        classification, tagging or regression task, ``<task>_encoder`` and ``<task>_decoder_step`` (the
        self-attention cache as an input and an output) for each generation task; dynamic batch and length.
        ``zoo.multitask.graphs.greedy_decode`` runs the two generation graphs as ``generate`` decodes."""
        from zoo.multitask.graphs import task_graphs

        return task_graphs(self.model)

    # ------------------------------------------------------------------ model
    def forward(
        self,
        input_ids: torch.Tensor,
        padding_mask: torch.Tensor | None,
        task: str,
        decoder_inputs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The task's prediction the loss is computed on: logits (B, C), (B, T, C), (B, L, V) or values.

        ``decoder_inputs`` (generation tasks only): the target behind ``<bos>``, for teacher forcing.
        """
        return self.model(input_ids, padding_mask, task, decoder_inputs)

    def generate(
        self,
        task: str,
        input_ids: torch.Tensor,
        padding_mask: torch.Tensor | None,
        num_beams: int | None = None,
    ) -> torch.Tensor:
        """Decoded ids for a generation task (greedy for one beam), ``<bos>`` excluded."""
        beams = num_beams or self.hparams.num_beams
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
        generation = self.tasks[task].type == GENERATION
        decoder_inputs = teacher_forcing_inputs(batch["target_ids"]) if generation else None
        output = self(batch["input_ids"], batch["padding_mask"], task, decoder_inputs)
        loss, preds, target = self._loss(task, batch, output)
        self.log(
            f"{stage}/{task}/loss",
            loss.detach(),
            on_step=stage == "train",
            on_epoch=True,
            sync_dist=True,
            batch_size=batch["input_ids"].shape[0],
        )
        self.update_metrics(stage, preds, target, group=task)
        if generation and stage != "train":
            generated = self.generate(task, batch["input_ids"], batch["padding_mask"])
            matches = sequences_match(generated, batch["target_ids"]).float()
            self.update_metrics(stage, matches, group=generated_group(task))
        return loss

    # --------------------------------------------------------------- training
    def batch_tokens(self, batch: dict[str, dict | None]) -> int:
        """Input tokens over every task's batch, padding excluded (tokens/s of ``zoo.callbacks.ThroughputMonitor``)."""
        return int(sum(b["padding_mask"].sum() for b in batch.values() if b is not None))

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

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The weighting's projection (GradNorm's renormalisation) right after the step, before any callback's
        ``on_train_batch_end``: a checkpoint written there holds the projected weights a resumed run goes on from."""
        super().optimizer_step(*args, **kwargs)
        self.weighting.after_optimizer_step()

    def on_train_epoch_end(self) -> None:
        """The base logs the epoch's metrics; the weighting then sees each task's mean loss over all ranks."""
        super().on_train_epoch_end()
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

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """One record per input expression, every task run on it.

        A batch is ``{"text": [...], "id": [...], "input_ids", "padding_mask"}`` (from
        ``MultitaskDataModule.predict_dataloader``, or ``zoo serve``'s ``MultitaskRequestCodec``). Record:
        ``{"id": name, "expression": text, <task>: prediction, ...}`` in task order (the name is the text
        unless a request gave one; a batch without ``"id"`` names records by their text), where a prediction
        is, by task type:

        - sequence classification: the class name (``TaskSpec.label_names``), else the class id;
        - token classification: a list with one tag name (or id) per input token;
        - regression: a float (a list of floats for several outputs);
        - generation: the generated text (the ids up to ``<eos>`` when the module has no ``vocab_tokens``).
        """
        input_ids, padding_mask = batch["input_ids"], batch["padding_mask"]
        per_task = {task: self._predict_task(task, input_ids, padding_mask) for task in self.tasks}
        names = batch.get("id", batch["text"])
        return [
            {"id": name, "expression": text, **{task: values[row] for task, values in per_task.items()}}
            for row, (name, text) in enumerate(zip(names, batch["text"]))
        ]

    def _predict_task(self, task: str, input_ids: torch.Tensor, padding_mask: torch.Tensor) -> list:
        """The task's prediction for every row of the batch, as plain Python values."""
        spec = self.tasks[task]
        if spec.type == GENERATION:
            return [self._decode(row) for row in self.generate(task, input_ids, padding_mask).tolist()]
        output = self(input_ids, padding_mask, task).float()
        if spec.type == REGRESSION:
            return [values[0] if len(values) == 1 else values for values in output.tolist()]
        classes = output.argmax(-1).tolist()
        names = spec.label_names
        if spec.type == SEQUENCE_CLASSIFICATION:
            return [names[c] if names else c for c in classes]
        lengths = padding_mask.sum(1).tolist()
        return [[names[c] if names else c for c in row[:n]] for row, n in zip(classes, lengths)]

    def _decode(self, ids: list[int]) -> str | list[int]:
        if self.vocabulary is not None:
            return self.vocabulary.decode(ids)
        return ids[: ids.index(EOS_ID)] if EOS_ID in ids else ids

    # ------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[WEIGHTING_KEY] = self.weighting.config()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Loaded without a trainer (``load_from_checkpoint``), the module takes the weighting it was trained
        with; a trainer keeps the configured one (the base's state-dict check reports a different one)."""
        recorded = checkpoint.get(WEIGHTING_KEY)
        if self._trainer is None and recorded is not None and recorded != self.weighting.config():
            self.weighting = weighting_from_config(recorded)
            self.weighting.bind(list(self.tasks.values()))
        super().on_load_checkpoint(checkpoint)

    # --------------------------------------------------------------- optimizer
    def parameter_groups(self) -> list[dict]:
        """The model's decay / no-decay groups plus the weighting's own parameters (no decay, own LR)."""
        groups = weight_decay_groups(self.model)
        extra = self.weighting.parameter_group()
        return [*groups, extra] if extra else groups


def _check_vocabulary(vocab_size: int, vocab_tokens: list[str] | None, tokenizer: str) -> None:
    """The tokens predictions decode with must be the model's vocabulary: its size, special tokens first."""
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size={vocab_size} leaves no token beside the {len(SPECIAL_TOKENS)} special ones"
        )
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; expected one of {', '.join(TOKENIZERS)}")
    if vocab_tokens is not None and (
        len(vocab_tokens) != vocab_size or tuple(vocab_tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS
    ):
        raise ValueError(
            f"vocab_tokens must hold vocab_size={vocab_size} tokens, "
            f"starting with {', '.join(SPECIAL_TOKENS)}"
        )


def _check_metric_groups(specs: list[TaskSpec]) -> None:
    """A task may not be named like another task's generated-output metric group (``<task>_generated``)."""
    names = {spec.name for spec in specs}
    for spec in specs:
        if spec.type == GENERATION and generated_group(spec.name) in names:
            raise ValueError(
                f"task {generated_group(spec.name)!r} clashes with the metric group of generation task "
                f"{spec.name!r}'s decoded outputs; rename it"
            )
