"""Structured pruning that makes models really smaller: attention heads, MLP units, whole blocks, conv channels.

``torch.nn.utils.prune`` and Lightning's ``ModelPruning`` only mask, so nothing gets faster. Here the layers
are rebuilt with fewer rows/columns:

- Attention heads and feed-forward hidden units of any zoo transformer (timm ViTs, ESM-2, the multitask
  Transformer), written here (:mod:`~zoo.callbacks.compression.surgery`): a pruned head removes its query,
  key and value rows and its output-projection columns; a pruned hidden unit a row of ``fc1`` and a column of
  ``fc2``. The models' own ``forward`` then runs unchanged on the smaller layers.
- Whole blocks of deep transformers (layer dropping), ranked by Block Influence (ShortGPT, Men et al. 2024:
  ``1 - cos(block input, block output)`` averaged over calibration tokens); the least influential go.
- Conv channels: reused from ``torch_pruning`` (Fang et al. 2023), whose dependency graph finds the layers
  coupled to a channel (the next conv's inputs, BatchNorm, residual additions) and shrinks them together.

Importance: ``l1``/``l2`` norm of each unit's weights, or ``taylor`` (Molchanov et al. 2019: ``(sum g * w)^2``
over the unit, gradients from calibration batches through ``distillation_targets``).

Every change is recorded (kept indices per layer) so a checkpoint rebuilds the pruned architecture
(:mod:`zoo.callbacks.compression.records`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn

from zoo.callbacks.compression.calibration import batch_inputs, calibration_batches, supervised_loss
from zoo.callbacks.compression.records import (
    add_record,
    install_restore_hook,
    records_of,
    register_replay,
    save_records,
)
from zoo.callbacks.compression.surgery import (
    attention_modules,
    drop_blocks,
    feed_forward_modules,
    notify_head_pruning,
    prune_attention_heads,
    prune_mlp_units,
    unit_slices,
)
from zoo.extras import require

__all__ = [
    "StructuredPruning",
    "block_influence",
    "drop_blocks",
    "prune_attention_heads",
    "prune_conv_channels",
    "prune_mlp_units",
    "prune_transformer",
]

Importance = Literal["l1", "l2", "taylor"]


# ----------------------------------------------------------------------------------------- importance
def _unit_scores(parts: list[tuple[Tensor, Tensor | None]], kind: Importance) -> Tensor:
    """``parts``: (weights, grads) arranged ``(units, ...)``; the score of each unit."""
    total = None
    for weight, grad in parts:
        weight = weight.detach().flatten(1).float()
        if kind == "l1":
            score = weight.abs().sum(1)
        elif kind == "l2":
            score = weight.pow(2).sum(1)
        elif kind == "taylor":
            if grad is None:
                raise RuntimeError("taylor importance needs gradients: run calibration backward passes first")
            score = (weight * grad.detach().flatten(1).float()).sum(1)
        else:
            raise ValueError(f"importance must be 'l1', 'l2' or 'taylor', got {kind!r}")
        total = score if total is None else total + score
    assert total is not None
    return total.pow(2) if kind == "taylor" else (total.sqrt() if kind == "l2" else total)


def head_scores(attn: nn.Module, kind: Importance) -> Tensor:
    """The importance of each prunable unit (head or key/value group) of an attention module."""
    return _unit_scores(unit_slices(attn), kind)


def mlp_scores(mlp: nn.Module, kind: Importance) -> Tensor:
    """The importance of each hidden unit of an ``fc1 -> fc2`` layer (its fc1 row and bias, its fc2 column)."""
    fc1, fc2 = mlp.fc1, mlp.fc2
    parts = [(fc1.weight, fc1.weight.grad), (fc2.weight.t(), _transpose(fc2.weight.grad))]
    if fc1.bias is not None:
        parts.append((fc1.bias[:, None], fc1.bias.grad[:, None] if fc1.bias.grad is not None else None))
    return _unit_scores(parts, kind)


def _transpose(t: Tensor | None) -> Tensor | None:
    return t.t() if t is not None else None


def _lowest(scores: Tensor, fraction: float) -> list[int]:
    """Indices to keep after removing ``round(fraction * n)`` lowest-scoring units (at least one kept)."""
    n = len(scores)
    remove = min(n - 1, round(fraction * n))
    order = torch.argsort(scores, descending=True, stable=True)
    return sorted(order[: n - remove].tolist())


def block_influence(model: nn.Module, container: str, inputs: list[Any]) -> Tensor:
    """ShortGPT's Block Influence of each block in ``container``: ``1 - cos(x_in, x_out)`` averaged over tokens."""
    blocks = model.get_submodule(container)
    sums = torch.zeros(len(blocks))
    counts = torch.zeros(len(blocks))
    handles = []

    def hook(index: int) -> Callable:
        def fn(module: nn.Module, args: tuple, output: Any) -> None:
            x_in = args[0].detach().flatten(0, -2).float()
            x_out = (
                (output[0] if isinstance(output, (tuple, list)) else output).detach().flatten(0, -2).float()
            )
            sums[index] += (1 - torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1)).sum().cpu()
            counts[index] += x_in.shape[0]

        return fn

    for i, block in enumerate(blocks):
        handles.append(block.register_forward_hook(hook(i)))
    try:
        with torch.no_grad():
            for x in inputs:
                model(x)
    finally:
        for handle in handles:
            handle.remove()
    return sums / counts.clamp(min=1)


def _blocks_container(model: nn.Module) -> str:
    """The container of the transformer blocks: the nearest ``Sequential``/``ModuleList`` above an attention."""
    attentions = attention_modules(model)
    if not attentions:
        raise ValueError(f"{type(model).__name__} has no transformer blocks to drop")
    parts = attentions[0][0].split(".")
    for length in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:length])
        if isinstance(model.get_submodule(name), (nn.Sequential, nn.ModuleList)):
            return name
    raise TypeError(f"the attention {attentions[0][0]!r} is not inside a sequence of blocks")


# ---------------------------------------------------------------------------------- transformer pruning
def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def prune_transformer(
    model: nn.Module,
    head_fraction: float = 0.0,
    mlp_fraction: float = 0.0,
    drop_layers: int = 0,
    importance: Importance = "l2",
    calibration_inputs: list[Any] | None = None,
) -> dict:
    """Remove ``head_fraction`` of every attention's heads, ``mlp_fraction`` of every feed-forward layer's
    hidden units and ``drop_layers`` whole blocks, in place; returns (and records) what was kept.

    Works on every attention layout of :mod:`~zoo.callbacks.compression.surgery` (timm ViTs, ESM-2, the
    multitask Transformer). The same count is removed everywhere, so all layers keep equal shapes (uniform,
    latency-friendly, and what ESM-2's contact head needs). ``importance="taylor"`` reads ``.grad`` of the
    weights (fill it before calling); ``drop_layers`` needs ``calibration_inputs`` (a list of model inputs)
    and blocks held in an ``nn.Sequential``.
    """
    _check_fraction("head_fraction", head_fraction)
    _check_fraction("mlp_fraction", mlp_fraction)
    record: dict[str, Any] = {"kind": "transformer_structured", "blocks": None, "heads": {}, "mlp": {}}
    if drop_layers:
        container = _blocks_container(model)
        if calibration_inputs is None:
            raise ValueError("drop_layers ranks blocks by Block Influence and needs calibration_inputs")
        count = len(model.get_submodule(container))
        if not 0 < drop_layers < count:
            raise ValueError(f"drop_layers must be between 1 and {count - 1}, got {drop_layers}")
        influence = block_influence(model, container, calibration_inputs)
        keep = sorted(torch.argsort(influence, descending=True)[: count - drop_layers].tolist())
        drop_blocks(model, container, keep)
        record["blocks"] = {"container": container, "keep": keep}
    if head_fraction > 0:
        for name, attn in attention_modules(model):
            record["heads"][name] = _lowest(head_scores(attn, importance), head_fraction)
    if mlp_fraction > 0:
        for name, mlp in feed_forward_modules(model):
            record["mlp"][name] = _lowest(mlp_scores(mlp, importance), mlp_fraction)
    _prune_units(model, record)
    add_record(model, record)
    return record


def _prune_units(model: nn.Module, record: dict) -> None:
    for name, keep in record["heads"].items():
        prune_attention_heads(model.get_submodule(name), keep)
    for name, keep in record["mlp"].items():
        prune_mlp_units(model.get_submodule(name), keep)
    if record["heads"]:
        notify_head_pruning(model, record["heads"])


@register_replay("transformer_structured")
def _replay_transformer(model: nn.Module, record: dict) -> None:
    if record.get("blocks"):
        drop_blocks(model, record["blocks"]["container"], record["blocks"]["keep"])
    _prune_units(model, record)


# ------------------------------------------------------------------------------------- conv channels
def _dependency_graph(model: nn.Module, example_inputs: Tensor):
    tp = require("torch_pruning", "compression", "conv channel pruning")

    return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)


def prune_conv_channels(
    model: nn.Module,
    example_inputs: Tensor,
    fraction: float,
    importance: Importance = "l2",
    ignored_layers: Sequence[nn.Module] = (),
) -> dict:
    """Remove ``fraction`` of the output channels of every prunable conv group with ``torch_pruning``.

    Coupled layers (BatchNorm, the next conv's input channels, residual partners) shrink together; the final
    classifier (every ``nn.Linear``) and depthwise groups are left as torch_pruning decides. ``taylor`` reads
    ``.grad`` (fill it first). Returns (and records) the pruned channel indices per root conv, in order.
    """
    tp = require("torch_pruning", "compression", "conv channel pruning")

    if not 0.0 < fraction < 1.0:
        raise ValueError(f"channel fraction must be in (0, 1), got {fraction}")
    importance_fn = {
        "l1": tp.importance.GroupMagnitudeImportance(p=1),
        "l2": tp.importance.GroupMagnitudeImportance(p=2),
        "taylor": tp.importance.GroupTaylorImportance(),
    }[importance]
    ignored = list(ignored_layers) + [m for m in model.modules() if isinstance(m, nn.Linear)]
    pruner = tp.pruner.MetaPruner(
        model,
        example_inputs,
        importance=importance_fn,
        pruning_ratio=fraction,
        ignored_layers=ignored,
        root_module_types=[nn.Conv2d],
    )
    names = {m: n for n, m in model.named_modules()}
    groups: list[list] = []
    for group in pruner.step(interactive=True):
        dep, idxs = group[0].dep, group[0].idxs
        groups.append(
            [names[dep.target.module], "out" if "out" in dep.handler.__name__ else "in", list(idxs)]
        )
        group.prune()
    record = {"kind": "conv_channels", "input_shape": list(example_inputs.shape), "groups": groups}
    add_record(model, record)
    return record


@register_replay("conv_channels")
def _replay_conv(model: nn.Module, record: dict) -> None:
    graph = _dependency_graph(model, torch.zeros(record["input_shape"]))
    for name, direction, idxs in record["groups"]:
        module = model.get_submodule(name)
        pruner = graph.get_pruner_of_module(module)
        handler = pruner.prune_out_channels if direction == "out" else pruner.prune_in_channels
        graph.get_pruning_group(module, handler, idxs=idxs).prune()


# ---------------------------------------------------------------------------------------- the callback
def _accumulate_gradients(pl_module: LightningModule, batches: list[Any]) -> None:
    pl_module.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for batch in batches:
            (supervised_loss(pl_module, batch) / len(batches)).backward()


def _parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class StructuredPruning(Callback):
    """Physically remove attention heads, feed-forward units, blocks or conv channels once, before fine-tuning.

    Pruning happens in ``setup("fit")``, before Lightning builds the optimizer, so the fit that follows is
    the fine-tune of the smaller model (the usual prune-then-fine-tune recipe); nothing happens when the fit
    resumes from a checkpoint (the checkpoint rebuilds the pruned model). Saved checkpoints carry the kept
    indices; ``zoo validate/test/predict --ckpt_path`` with a config that lists this callback rebuilds the
    pruned model before loading its weights (:func:`zoo.callbacks.compression.load_compressed` from Python).

    Args:
        head_fraction / mlp_fraction: fraction of every attention's heads / feed-forward layer's hidden units.
        drop_layers: number of whole transformer blocks to remove (lowest Block Influence).
        channel_fraction: fraction of conv output channels to remove (``torch_pruning``; conv networks).
        importance: ``l1``, ``l2`` or ``taylor`` (gradients from ``calibration_batches`` training batches).
        calibration_batches: training batches for Taylor scores, Block Influence and the example input.
        start_from_teacher: first copy the weights of the ``Distillation`` callback's teacher into the model:
            the dense trained model is then both the starting point and the teacher of the pruned one, with
            one checkpoint path given once (``--trainer.callbacks.init_args.teacher_checkpoint``).
        input_key: the batch entry holding the model input (dict batches).
    """

    def __init__(
        self,
        head_fraction: float = 0.0,
        mlp_fraction: float = 0.0,
        drop_layers: int = 0,
        channel_fraction: float = 0.0,
        importance: Importance = "l2",
        calibration_batches: int = 4,
        start_from_teacher: bool = False,
        input_key: str = "image",
    ) -> None:
        if importance not in ("l1", "l2", "taylor"):
            raise ValueError(f"importance must be 'l1', 'l2' or 'taylor', got {importance!r}")
        if not (head_fraction or mlp_fraction or drop_layers or channel_fraction):
            raise ValueError(
                "StructuredPruning needs head_fraction, mlp_fraction, drop_layers or channel_fraction"
            )
        if not 0.0 <= channel_fraction < 1.0:
            raise ValueError(f"channel_fraction must be in [0, 1), got {channel_fraction}")
        self.head_fraction, self.mlp_fraction, self.drop_layers = head_fraction, mlp_fraction, drop_layers
        self.channel_fraction, self.importance = channel_fraction, importance
        self.calibration_batches, self.start_from_teacher, self.input_key = (
            calibration_batches,
            start_from_teacher,
            input_key,
        )
        self.report: dict[str, Any] = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        install_restore_hook(pl_module)
        if stage != "fit" or trainer.ckpt_path is not None:
            return
        if any(r["kind"] in ("transformer_structured", "conv_channels") for r in records_of(pl_module)):
            return  # already pruned (a second fit on the same module)
        if self.start_from_teacher:
            self._copy_teacher(trainer, pl_module)
        self.prune(trainer, pl_module)

    def _copy_teacher(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from zoo.callbacks.distillation import Distillation, load_teacher

        teachers = [c for c in trainer.callbacks if isinstance(c, Distillation)]
        if not teachers:
            raise ValueError(
                "start_from_teacher=True needs a zoo.callbacks.Distillation callback in the trainer"
            )
        callback = teachers[0]
        if callback.teacher is None:
            callback.teacher = load_teacher(
                callback.teacher_spec, callback.teacher_init_args, callback.teacher_checkpoint
            )
        try:
            pl_module.load_state_dict(callback.teacher.state_dict())
        except RuntimeError as error:
            raise ValueError(
                "start_from_teacher: the teacher's weights do not fit the model (they must share the architecture): "
                f"{error}"
            ) from error

    def prune(self, trainer: Trainer, pl_module: LightningModule) -> None:
        before = _parameter_count(pl_module)
        needs_data = self.importance == "taylor" or self.drop_layers or self.channel_fraction
        batches = (
            calibration_batches(trainer, pl_module, "train", self.calibration_batches) if needs_data else []
        )
        if self.importance == "taylor":
            _accumulate_gradients(pl_module, batches)
        inputs = [batch_inputs(b, self.input_key) for b in batches]
        was_training = pl_module.training
        pl_module.eval()
        try:
            if self.head_fraction or self.mlp_fraction or self.drop_layers:
                prune_transformer(
                    pl_module,
                    self.head_fraction,
                    self.mlp_fraction,
                    self.drop_layers,
                    self.importance,
                    inputs,
                )
            if self.channel_fraction:
                prune_conv_channels(pl_module, inputs[0][:1], self.channel_fraction, self.importance)
        finally:
            pl_module.zero_grad(set_to_none=True)
            pl_module.train(was_training)
        after = _parameter_count(pl_module)
        self.report = {"parameters_before": before, "parameters_after": after, "ratio": after / before}

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        save_records(pl_module, checkpoint)
