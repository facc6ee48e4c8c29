"""Structured pruning that makes models really smaller: attention heads, MLP units, whole blocks, conv channels.

``torch.nn.utils.prune`` and Lightning's ``ModelPruning`` only mask, so nothing gets faster. Here the layers
are rebuilt with fewer rows/columns:

- timm ViT blocks (``timm.layers.Attention`` + ``timm.layers.Mlp``), written here: a pruned head removes its
  rows of ``qkv`` (query, key and value parts) and of the optional gate, its columns of ``proj``, and lowers
  ``num_heads``/``attn_dim``; a pruned MLP unit removes a row of ``fc1`` and a column of ``fc2``. timm's own
  ``forward`` then runs unchanged on the smaller layers.
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

__all__ = [
    "StructuredPruning",
    "block_influence",
    "drop_blocks",
    "prune_attention_heads",
    "prune_conv_channels",
    "prune_mlp_units",
    "prune_vit",
    "vit_blocks",
]

Importance = Literal["l1", "l2", "taylor"]


# --------------------------------------------------------------------------------------- layer surgery
def _select(linear: nn.Linear, rows: Tensor | None = None, cols: Tensor | None = None) -> nn.Linear:
    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        weight = weight[rows]
        bias = bias[rows] if bias is not None else None
    if cols is not None:
        weight = weight[:, cols]
    new = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.train(linear.training)
    return new


def _select_norm(norm: nn.Module, keep: Tensor) -> None:
    if isinstance(norm, nn.LayerNorm):
        norm.normalized_shape = (len(keep),)
        if norm.weight is not None:
            norm.weight = nn.Parameter(norm.weight.detach()[keep].clone())
        if norm.bias is not None:
            norm.bias = nn.Parameter(norm.bias.detach()[keep].clone())
    elif not isinstance(norm, nn.Identity):
        raise TypeError(f"cannot prune through a {type(norm).__name__} normalisation")


def prune_attention_heads(attn: nn.Module, keep: Sequence[int]) -> None:
    """Keep only heads ``keep`` of a timm ``Attention`` (qkv rows, gate rows, proj columns, num_heads)."""
    keep_t = torch.as_tensor(sorted(keep), dtype=torch.long)
    heads, head_dim = attn.num_heads, attn.head_dim
    if len(keep_t) == 0 or keep_t.max() >= heads:
        raise ValueError(f"keep must name between 1 and {heads} of the {heads} heads, got {list(keep)}")
    units = (keep_t[:, None] * head_dim + torch.arange(head_dim)).flatten()  # channels of the kept heads
    attn_dim = heads * head_dim
    qkv_rows = torch.cat([units + part * attn_dim for part in range(3)])
    attn.qkv = _select(attn.qkv, rows=qkv_rows)
    if getattr(attn, "gate", None) is not None:
        attn.gate = _select(attn.gate, rows=units)
    _select_norm(attn.norm, units)
    attn.proj = _select(attn.proj, cols=units)
    attn.num_heads = len(keep_t)
    attn.attn_dim = len(keep_t) * head_dim


def prune_mlp_units(mlp: nn.Module, keep: Sequence[int]) -> None:
    """Keep only hidden units ``keep`` of a timm ``Mlp`` (fc1 rows, fc2 columns, optional hidden norm)."""
    keep_t = torch.as_tensor(sorted(keep), dtype=torch.long)
    if len(keep_t) == 0 or keep_t.max() >= mlp.fc1.out_features:
        raise ValueError(f"keep must name between 1 and {mlp.fc1.out_features} hidden units")
    mlp.fc1 = _select(mlp.fc1, rows=keep_t)
    _select_norm(mlp.norm, keep_t)
    mlp.fc2 = _select(mlp.fc2, cols=keep_t)


def _is_vit_block(module: nn.Module) -> bool:
    attn, mlp = getattr(module, "attn", None), getattr(module, "mlp", None)
    return (
        attn is not None
        and all(hasattr(attn, a) for a in ("qkv", "proj", "num_heads", "head_dim"))
        and isinstance(attn.qkv, nn.Linear)
        and mlp is not None
        and isinstance(getattr(mlp, "fc1", None), nn.Linear)
        and isinstance(getattr(mlp, "fc2", None), nn.Linear)
    )


def vit_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The timm-style transformer blocks (``attn.qkv/proj``, ``mlp.fc1/fc2``) of ``model``, by name."""
    return [(name, m) for name, m in model.named_modules() if _is_vit_block(m)]


def drop_blocks(model: nn.Module, container: str, keep: Sequence[int]) -> None:
    """Keep only the blocks ``keep`` of the ``nn.Sequential`` named ``container`` (e.g. ``model.blocks``)."""
    blocks = model.get_submodule(container)
    if not isinstance(blocks, nn.Sequential):
        raise TypeError(f"{container!r} is a {type(blocks).__name__}; layer dropping needs an nn.Sequential")
    kept = [blocks[i] for i in sorted(keep)]
    parent_name, _, attribute = container.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attribute, nn.Sequential(*kept))


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


def _grad(p: Tensor) -> Tensor | None:
    return p.grad


def head_scores(attn: nn.Module, kind: Importance) -> Tensor:
    heads, head_dim, dim = attn.num_heads, attn.head_dim, attn.qkv.in_features
    qkv_w = attn.qkv.weight.view(3, heads, head_dim, dim).transpose(0, 1).reshape(heads, -1)
    qkv_g = _grad(attn.qkv.weight)
    qkv_g = (
        qkv_g.view(3, heads, head_dim, dim).transpose(0, 1).reshape(heads, -1) if qkv_g is not None else None
    )
    proj_w = attn.proj.weight.view(attn.proj.out_features, heads, head_dim).transpose(0, 1)
    proj_g = _grad(attn.proj.weight)
    proj_g = (
        proj_g.view(attn.proj.out_features, heads, head_dim).transpose(0, 1) if proj_g is not None else None
    )
    parts = [(qkv_w, qkv_g), (proj_w, proj_g)]
    if attn.qkv.bias is not None:
        b, g = attn.qkv.bias, _grad(attn.qkv.bias)
        parts.append(
            (
                b.view(3, heads, head_dim).transpose(0, 1),
                g.view(3, heads, head_dim).transpose(0, 1) if g is not None else None,
            )
        )
    return _unit_scores(parts, kind)


def mlp_scores(mlp: nn.Module, kind: Importance) -> Tensor:
    parts = [(mlp.fc1.weight, _grad(mlp.fc1.weight)), (mlp.fc2.weight.t(), _transpose(_grad(mlp.fc2.weight)))]
    if mlp.fc1.bias is not None:
        parts.append((mlp.fc1.bias[:, None], _unsqueeze(_grad(mlp.fc1.bias))))
    return _unit_scores(parts, kind)


def _transpose(t: Tensor | None) -> Tensor | None:
    return t.t() if t is not None else None


def _unsqueeze(t: Tensor | None) -> Tensor | None:
    return t[:, None] if t is not None else None


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
    blocks = vit_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no timm-style transformer blocks to prune")
    container = blocks[0][0].rpartition(".")[0]
    if not isinstance(model.get_submodule(container), nn.Sequential):
        raise TypeError(f"the transformer blocks live in {container!r}, which is not an nn.Sequential")
    return container


# ------------------------------------------------------------------------------------------ ViT pruning
def prune_vit(
    model: nn.Module,
    head_fraction: float = 0.0,
    mlp_fraction: float = 0.0,
    drop_layers: int = 0,
    importance: Importance = "l2",
    calibration_inputs: list[Any] | None = None,
) -> dict:
    """Remove ``head_fraction`` of every block's heads, ``mlp_fraction`` of its MLP units and ``drop_layers``
    whole blocks, in place; returns (and records) the kept indices.

    The same count is removed from every block, so all blocks keep equal shapes (uniform, latency-friendly).
    ``importance="taylor"`` reads ``.grad`` of the weights (fill it before calling); ``drop_layers`` needs
    ``calibration_inputs`` (a list of model inputs).
    """
    for name, value in (("head_fraction", head_fraction), ("mlp_fraction", mlp_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    record: dict[str, Any] = {"kind": "vit_structured", "blocks": None, "heads": {}, "mlp": {}}
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
    for name, block in vit_blocks(model):
        if head_fraction > 0:
            keep = _lowest(head_scores(block.attn, importance), head_fraction)
            prune_attention_heads(block.attn, keep)
            record["heads"][name] = keep
        if mlp_fraction > 0:
            keep = _lowest(mlp_scores(block.mlp, importance), mlp_fraction)
            prune_mlp_units(block.mlp, keep)
            record["mlp"][name] = keep
    add_record(model, record)
    return record


@register_replay("vit_structured")
def _replay_vit(model: nn.Module, record: dict) -> None:
    if record.get("blocks"):
        drop_blocks(model, record["blocks"]["container"], record["blocks"]["keep"])
    for name, keep in record["heads"].items():
        prune_attention_heads(model.get_submodule(name).attn, keep)
    for name, keep in record["mlp"].items():
        prune_mlp_units(model.get_submodule(name).mlp, keep)


# ------------------------------------------------------------------------------------- conv channels
def _dependency_graph(model: nn.Module, example_inputs: Tensor):
    import torch_pruning as tp

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
    import torch_pruning as tp

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
    """Physically remove heads, MLP units, blocks (timm ViTs) or conv channels once, before fine-tuning.

    Pruning happens in ``setup("fit")``, before Lightning builds the optimizer, so the fit that follows is
    the fine-tune of the smaller model (the usual prune-then-fine-tune recipe); nothing happens when the fit
    resumes from a checkpoint (the checkpoint rebuilds the pruned model). Saved checkpoints carry the kept
    indices; ``zoo validate/test/predict --ckpt_path`` with a config that lists this callback rebuilds the
    pruned model before loading its weights (:func:`zoo.callbacks.compression.load_compressed` from Python).

    Args:
        head_fraction / mlp_fraction: fraction of each ViT block's heads / MLP hidden units to remove.
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
        if any(r["kind"] in ("vit_structured", "conv_channels") for r in records_of(pl_module)):
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
                prune_vit(
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
