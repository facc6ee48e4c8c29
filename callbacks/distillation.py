"""Knowledge distillation as callbacks: ``Distillation`` (a fixed teacher) and ``SelfDistillation`` (EMA teacher).

Lightning has no distillation callback (its issue #17592 asks for an example); timm's ``task/`` and DeiT's
``DistillationLoss`` live inside their own training loops. Here the student is any LightningModule with
``distillation_targets(batch) -> (student_logits, labels)`` (see ``zoo.callbacks``): during ``fit`` the
callback replaces its ``training_step`` by one that calls ``distillation_targets``, runs the teacher on the
same (already augmented) inputs and returns the combined loss. The teacher is a plain attribute of the
callback, so it is never in the student's checkpoint, optimizer or DDP wrapper; it runs frozen, in eval
mode, under ``no_grad`` and inside ``trainer.precision_plugin.forward_context()`` on the student's device.
"""

from __future__ import annotations

import copy
import importlib
import types
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn

from zoo.callbacks.ema import EMA

__all__ = ["Distillation", "FeatureProjector", "SelfDistillation", "distillation_loss", "load_teacher"]

Mode = Literal["soft", "hard", "deit"]


def _soft_kl(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Hinton's term: KL(teacher_T || student_T) * T^2 (batch mean), so gradients keep their size across T."""
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature**2


def distillation_loss(
    student: Tensor | tuple[Tensor, Tensor],
    labels: Tensor,
    teacher: Tensor,
    mode: Mode = "soft",
    alpha: float = 0.5,
    temperature: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``(1 - alpha) * task + alpha * distill`` and its parts.

    ``student`` is the logits, or ``(class_logits, distillation_logits)`` for a distillation-token model
    (DeiT): then the task loss uses the class head and the distillation loss the distillation head, as in
    DeiT's ``DistillationLoss``. ``labels`` are class indices or soft targets (mixup). Modes: ``soft`` (KL
    on temperature-scaled softmax x T^2), ``hard`` (cross-entropy with the teacher's argmax), ``deit``
    (``hard`` on the distillation token; requires the two heads).
    """
    if isinstance(student, (tuple, list)):
        class_logits, dist_logits = student
    elif mode == "deit":
        raise ValueError(
            "mode='deit' needs a student with a distillation token: distillation_targets must return "
            "(class_logits, distillation_logits), e.g. ImageClassifier('deit_tiny_distilled_patch16_224')"
        )
    else:
        class_logits = dist_logits = student
    task = F.cross_entropy(class_logits, labels)
    if mode == "soft":
        distill = _soft_kl(dist_logits, teacher, temperature)
    elif mode in ("hard", "deit"):
        distill = F.cross_entropy(dist_logits, teacher.argmax(dim=-1))
    else:
        raise ValueError(f"distillation mode must be 'soft', 'hard' or 'deit', got {mode!r}")
    return (1 - alpha) * task + alpha * distill, {
        "task_loss": task.detach(),
        "distill_loss": distill.detach(),
    }


def _import(class_path: str) -> type:
    module_name, _, name = class_path.rpartition(".")
    if not module_name:
        raise ValueError(
            f"teacher class must be a full class path such as 'zoo.vision.ImageClassifier', got {class_path!r}"
        )
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot import teacher class {class_path!r}: {error}") from error


def load_teacher(
    teacher: str | nn.Module | None = None,
    init_args: dict[str, Any] | None = None,
    checkpoint: str | Path | None = None,
) -> nn.Module:
    """A teacher from a module, a class path (+ ``init_args``) and/or a checkpoint.

    A checkpoint alone works when it was written by the ``zoo`` CLI (``LightningCLI`` stores the class path as
    ``hyper_parameters._class_path``); its hyper-parameters build the module. Loading is ``weights_only``.
    """
    state = None
    hparams: dict[str, Any] = {}
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"teacher checkpoint {str(path)!r} does not exist")
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
        if not isinstance(state, dict):
            raise ValueError(f"teacher checkpoint {str(path)!r} holds no state dict")
        hparams = dict(loaded.get("hyper_parameters", {}))
    if isinstance(teacher, nn.Module):
        module = teacher
    else:
        class_path = teacher or hparams.get("_class_path")
        if class_path is None:
            raise ValueError(
                f"teacher checkpoint {str(checkpoint)!r} does not name its class (no hyper_parameters._class_path);"
                " give the teacher's class path too"
            )
        kwargs = (
            {k: v for k, v in hparams.items() if not k.startswith("_")} if init_args is None else init_args
        )
        module = _import(class_path)(**kwargs)
    if state is not None:
        module.load_state_dict(state)
    return module


def _inputs(batch: Any, key: str) -> Any:
    """What the teacher is called on: ``batch[key]`` for dicts, the first item of tuples, else the batch."""
    if isinstance(batch, dict):
        return batch[key]
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


class _DistillationBase(Callback):
    """Replaces the student's ``training_step`` during ``fit`` by a distillation step; restores it after."""

    def __init__(self, mode: Mode, alpha: float, temperature: float, input_key: str) -> None:
        if mode not in ("soft", "hard", "deit"):
            raise ValueError(f"distillation mode must be 'soft', 'hard' or 'deit', got {mode!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"distillation alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ValueError(f"distillation temperature must be > 0, got {temperature}")
        self.mode, self.alpha, self.temperature, self.input_key = mode, alpha, temperature, input_key
        self.teacher: nn.Module | None = None
        self._original_step = None

    def _teacher_logits(self, trainer: Trainer, batch: Any) -> Tensor:
        assert self.teacher is not None
        self.teacher.eval()  # Lightning's train() calls reach only the student's modules; stay safe anyway
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            logits = self.teacher(_inputs(batch, self.input_key))
        if isinstance(logits, (tuple, list)):  # a distillation-token teacher: DeiT averages its heads
            logits = (logits[0] + logits[1]) / 2
        return logits.detach()

    def _prepare_teacher(self, trainer: Trainer, pl_module: LightningModule, teacher: nn.Module) -> nn.Module:
        teacher = trainer.precision_plugin.convert_module(teacher)  # casts for "*-true" precisions
        teacher.to(pl_module.device).eval().requires_grad_(False)
        return teacher

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not callable(getattr(pl_module, "distillation_targets", None)):
            raise TypeError(
                f"{type(pl_module).__name__} has no distillation_targets(batch) -> (student_logits, labels); "
                "see zoo.callbacks for the interface"
            )
        callback = self

        def training_step(module: LightningModule, batch: Any, batch_idx: int, *args: Any) -> Tensor:
            student, labels = module.distillation_targets(batch)  # may write augmented inputs into batch
            teacher = callback._teacher_logits(module.trainer, batch)
            loss, parts = distillation_loss(
                student, labels, teacher, callback.mode, callback.alpha, callback.temperature
            )
            extra = callback._extra_losses()
            for name, value in extra.items():
                loss = loss + value
                parts[name] = value.detach()
            size = len(labels)
            module.log("train/loss", loss, prog_bar=True, sync_dist=True, batch_size=size)
            for name, value in parts.items():
                module.log(f"train/{name}", value, sync_dist=True, batch_size=size)
            return loss

        self._original_step = pl_module.__dict__.get("training_step")
        pl_module.training_step = types.MethodType(training_step, pl_module)

    def _extra_losses(self) -> dict[str, Tensor]:
        """Further weighted loss terms of the step (feature distillation), added to the total and logged."""
        return {}

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_step(pl_module)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_step(pl_module)

    def _restore_step(self, pl_module: LightningModule) -> None:
        if "training_step" in pl_module.__dict__:
            del pl_module.training_step
        if self._original_step is not None:
            pl_module.training_step = self._original_step
            self._original_step = None


def _feature_dim(module: nn.Module, name: str) -> int:
    """The channel width a layer outputs: that of its last submodule that declares one."""
    for sub in reversed(list(module.modules())):
        for attribute in ("out_features", "out_channels", "normalized_shape", "embed_dim", "num_features"):
            value = getattr(sub, attribute, None)
            if isinstance(value, (tuple, list, torch.Size)) and value:
                value = value[-1]
            if isinstance(value, int):
                return value
    raise ValueError(
        f"cannot tell the output width of layer {name!r} ({type(module).__name__}): name a layer that ends in a "
        "Linear, Conv or norm layer (e.g. a transformer block)"
    )


def _first_tensor(output: Any) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class FeatureProjector(nn.Module):
    """A learned linear map from the student's feature width to the teacher's, on the channel dimension.

    Channels are the last dimension of token features ``(B, N, C)`` / ``(B, C)``, and dimension 1 of
    convolutional maps ``(B, C, H, W)`` (there it is a 1x1 convolution). FitNets' regressor.
    """

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(student_dim, teacher_dim)

    def forward(self, features: Tensor) -> Tensor:
        if features.ndim == 4:
            return self.linear(features.movedim(1, -1)).movedim(-1, 1)
        return self.linear(features)


class Distillation(_DistillationBase):
    """Distil a fixed teacher into the student (Hinton soft targets, hard labels, or DeiT's token recipe).

    Optionally also intermediate features (FitNets): for each ``student layer -> teacher layer`` pair in
    ``feature_layers``, the student's output goes through a learned :class:`FeatureProjector` to the teacher's
    width and an MSE against the teacher's output (same shape otherwise) is added with ``feature_weight``;
    token sequences of different length (a distillation token in one model only) are compared on their
    trailing, patch tokens.
    The projectors belong to this callback, not to the student: their parameters join the student's first
    optimizer as an extra parameter group (same hyper-parameters as its first group, following its LR
    schedule), they are saved in this callback's checkpoint state and restored on resume, and the student's
    own ``state_dict`` stays loadable without the callback. Under DDP their gradients are averaged across ranks.

    Args:
        teacher: the teacher's class path (e.g. ``zoo.vision.ImageClassifier``) or, from Python, a module.
            May be omitted when ``teacher_checkpoint`` was written by the ``zoo`` CLI.
        teacher_init_args: keyword arguments for the teacher class (default: the checkpoint's hyper-parameters).
        teacher_checkpoint: a checkpoint (Lightning's, or a bare state dict) with the teacher's weights.
        mode: ``soft``, ``hard`` or ``deit`` (see :func:`distillation_loss`).
        alpha: weight of the distillation term; ``1 - alpha`` weights the task loss (DeiT's convention).
        temperature: softmax temperature of the ``soft`` term (scaled back by T^2).
        input_key: the batch entry the teacher is called on, for dict batches.
        feature_layers: ``{student module name: teacher module name}`` (names as in ``named_modules()``, e.g.
            ``{"model.blocks.1": "model.blocks.3"}``) for feature distillation; ``None`` disables it.
        feature_weight: weight of the summed feature MSE terms.
    """

    def __init__(
        self,
        teacher: str | nn.Module | None = None,
        teacher_init_args: dict[str, Any] | None = None,
        teacher_checkpoint: str | None = None,
        mode: Mode = "soft",
        alpha: float = 0.5,
        temperature: float = 1.0,
        input_key: str = "image",
        feature_layers: dict[str, str] | None = None,
        feature_weight: float = 1.0,
    ) -> None:
        super().__init__(mode, alpha, temperature, input_key)
        if teacher is None and teacher_checkpoint is None:
            raise ValueError(
                "Distillation needs a teacher class path, a teacher module or a teacher checkpoint"
            )
        if feature_weight < 0:
            raise ValueError(f"distillation feature_weight must be >= 0, got {feature_weight}")
        self.teacher_spec, self.teacher_init_args, self.teacher_checkpoint = (
            teacher,
            teacher_init_args,
            teacher_checkpoint,
        )
        self.feature_layers = dict(feature_layers or {})
        self.feature_weight = feature_weight
        self.projectors: nn.ModuleDict | None = None
        self._pending_projectors: dict[str, Tensor] | None = None
        self._captured: dict[tuple[str, str], Tensor] = {}
        self._hooks: list[Any] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and self.teacher is None:  # load early: a bad path fails before training starts
            self.teacher = load_teacher(self.teacher_spec, self.teacher_init_args, self.teacher_checkpoint)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert self.teacher is not None
        self.teacher = self._prepare_teacher(trainer, pl_module, self.teacher)
        if self.feature_layers:
            self._setup_features(trainer, pl_module)
        super().on_fit_start(trainer, pl_module)

    # ------------------------------------------------------------ feature distillation
    def _layer(self, root: nn.Module, name: str, role: str) -> nn.Module:
        try:
            return root.get_submodule(name)
        except AttributeError as error:
            raise ValueError(
                f"feature_layers names {role} layer {name!r}, which {type(root).__name__} does not have: {error}"
            ) from error

    def _setup_features(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Hooks on both models, projectors built (or reused) and added to the student's first optimizer.

        Runs in ``on_fit_start``: after the optimizers exist and before Lightning loads their state on resume,
        so a resumed optimizer finds the same parameter groups it saved.
        """
        assert self.teacher is not None
        pairs = [
            (s, t, self._layer(pl_module, s, "student"), self._layer(self.teacher, t, "teacher"))
            for s, t in self.feature_layers.items()
        ]
        if self.projectors is None:
            self.projectors = nn.ModuleDict(
                {
                    self._key(s): FeatureProjector(_feature_dim(sm, s), _feature_dim(tm, t))
                    for s, t, sm, tm in pairs
                }
            )
        self.projectors.to(pl_module.device)
        if self._pending_projectors is not None:
            self._load_projectors(self._pending_projectors)
            self._pending_projectors = None
        for s, _, student_layer, teacher_layer in pairs:
            for role, layer in (("student", student_layer), ("teacher", teacher_layer)):
                self._hooks.append(layer.register_forward_hook(self._capture(role, s)))
        optimizer = trainer.optimizers[0]
        group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
        group["params"] = list(self.projectors.parameters())
        optimizer.add_param_group(group)
        for config in trainer.lr_scheduler_configs:  # the new group follows the first group's schedule
            scheduler = config.scheduler
            if getattr(scheduler, "optimizer", None) is optimizer and hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs.append(scheduler.base_lrs[0])
                if isinstance(getattr(scheduler, "lr_lambdas", None), list):
                    scheduler.lr_lambdas.append(scheduler.lr_lambdas[0])
                if isinstance(getattr(scheduler, "_last_lr", None), list):
                    scheduler._last_lr.append(scheduler._last_lr[0])

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")  # ModuleDict keys cannot contain dots

    def _capture(self, role: str, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if role == "teacher" or module.training:  # the student's evaluation passes are not distilled
                self._captured[(role, name)] = _first_tensor(output)

        return hook

    def _extra_losses(self) -> dict[str, Tensor]:
        if not self.feature_layers:
            return {}
        assert self.projectors is not None
        total = None
        for name in self.feature_layers:
            student = self._captured.pop(("student", name), None)
            teacher = self._captured.pop(("teacher", name), None)
            if student is None or teacher is None:
                raise RuntimeError(
                    f"feature layer {name!r} -> {self.feature_layers[name]!r} produced no output in this step; "
                    "name layers that run in the model's forward"
                )
            projected = self.projectors[self._key(name)](student)
            if projected.ndim == 3 and teacher.ndim == 3 and projected.shape[1] != teacher.shape[1]:
                # Token sequences with different prefix tokens (DeiT's distillation token): timm puts the
                # prefix first, so the trailing (patch) tokens are the ones that correspond.
                n = min(projected.shape[1], teacher.shape[1])
                projected, teacher = projected[:, -n:], teacher[:, -n:]
            if projected.shape != teacher.shape:
                raise ValueError(
                    f"feature_layers {name!r} -> {self.feature_layers[name]!r}: projected student features have "
                    f"shape {tuple(projected.shape)}, the teacher's {tuple(teacher.shape)}; pair layers whose "
                    "outputs differ only in width"
                )
            term = F.mse_loss(projected.float(), teacher.float())
            total = term if total is None else total + term
        assert total is not None
        return {"feature_loss": self.feature_weight * total}

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        # The projectors sit outside the DDP wrapper: average their gradients as DDP does the student's.
        if self.projectors is None or trainer.world_size == 1:
            return
        for parameter in self.projectors.parameters():
            if parameter.grad is not None:
                parameter.grad.copy_(trainer.strategy.reduce(parameter.grad, reduce_op="mean"))

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._captured.clear()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_hooks()
        super().on_fit_end(trainer, pl_module)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._remove_hooks()
        super().on_exception(trainer, pl_module, exception)

    # ------------------------------------------------------------ checkpoint
    def _load_projectors(self, state: dict[str, Tensor]) -> None:
        assert self.projectors is not None
        with torch.no_grad():
            for name, value in self.projectors.state_dict(keep_vars=True).items():
                if name not in state:
                    raise KeyError(f"the checkpoint's Distillation state has no projector weight {name!r}")
                value.copy_(state[name])

    def state_dict(self) -> dict[str, Any]:
        # Identity only: the teacher's weights stay where they came from, never in the student's checkpoint.
        spec = self.teacher_spec if isinstance(self.teacher_spec, str) else type(self.teacher_spec).__name__
        state: dict[str, Any] = {
            "teacher": spec,
            "teacher_checkpoint": self.teacher_checkpoint,
            "mode": self.mode,
        }
        if self.projectors is not None:
            state["projectors"] = {k: v.detach().clone() for k, v in self.projectors.state_dict().items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        projectors = state_dict.get("projectors")
        if projectors is None:
            return
        if self.projectors is None:  # built later, in on_fit_start
            self._pending_projectors = dict(projectors)
        else:  # strategies that restore after set-up (FSDP, DeepSpeed)
            self._load_projectors(projectors)


class SelfDistillation(_DistillationBase):
    """Distil an EMA of the student into the student (mean-teacher style); the EMA is also a better model.

    The teacher is a copy of the student whose weights follow ``zoo.callbacks.EMA``'s update (fused,
    once per optimizer step, optional warmup); its weights are saved in this callback's state, so a resumed
    run continues with the same teacher. The loss is ``(1 - weight) * task + weight * KL * T^2``.

    Args:
        decay: EMA decay of the teacher.
        weight: weight of the distillation term (``alpha``).
        temperature: softmax temperature.
        warmup: timm-style decay warmup for the teacher's EMA.
        input_key: the batch entry the teacher is called on, for dict batches.
    """

    def __init__(
        self,
        decay: float = 0.999,
        weight: float = 0.1,
        temperature: float = 1.0,
        warmup: bool = False,
        input_key: str = "image",
    ) -> None:
        super().__init__("soft", weight, temperature, input_key)
        self.ema = EMA(decay=decay, warmup=warmup, evaluate_with_ema=False)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        owner = pl_module._trainer
        pl_module._trainer = None  # copy the module, not the trainer it points to
        try:
            teacher = copy.deepcopy(pl_module)
        finally:
            pl_module._trainer = owner
        self.teacher = self._prepare_teacher(trainer, pl_module, teacher)
        # The EMA's storage *is* the teacher's weights: one copy serves as both.
        self.ema._initialize(pl_module)
        pending = self.ema.state_dict()
        named = dict(self.teacher.named_parameters()) | dict(self.teacher.named_buffers())
        self.ema.ema = [named[name].data for name in self.ema.names]
        self.ema._apply_state(pending)
        super().on_fit_start(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.ema.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def state_dict(self) -> dict[str, Any]:
        return self.ema.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ema.load_state_dict(state_dict)
