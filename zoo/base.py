"""What every family's LightningModule shares, written once.

Modelled on torchgeo's ``BaseTask``. ``ZooModule.__init__`` saves the subclass's arguments as
hyper-parameters, then calls three hooks in order, so a family's ``__init__`` holds nothing but its
signature and argument checks:

- ``configure_models``: build ``self.model`` (the family's network, the same attribute everywhere) from
  ``self.hparams``;
- ``configure_losses``: loss modules and weights;
- ``configure_metrics``: a ``MetricCollection`` (one group), or a ``{group: MetricCollection}`` dict for
  per-task or per-kind metrics. Each group is cloned per stage and logged at the end of every epoch as
  ``<stage>/<collection prefix><metric>``, dict-valued metrics (mAP/NDS, contact precisions) flattened.

It also turns the optimizer and scheduler given in YAML into ``configure_optimizers``, checks a resumed
checkpoint against the model, shards ``sharding_units`` under FSDP2, compiles ``self.model`` with
``torch.compile`` when the family's ``compile`` argument asks (``configure_model``), and fixes the predict contract:
``predict_step`` returns one serialisable record per input (``zoo.predict``) and ``example_inputs()`` a small
batch in the network's input format for tracing.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import Metric, MetricCollection

from zoo.errors import ZooError
from zoo.optim import WarmupCosineLR, apply_lr_scales, weight_decay_groups

__all__ = [
    "COMPILE_OPTIONS",
    "DEFAULT_GROUP",
    "IGNORE_INDEX",
    "STAGES",
    "ZooModule",
    "compile_options",
    "rename_callback_states",
    "rename_keys",
]

STAGES = ("train", "val", "test")
#: Label value the zoo's losses and metrics skip (PyTorch's ``cross_entropy`` default).
IGNORE_INDEX = -100
#: Default metric group: its stage collections are keyed ``<stage>_metrics``.
DEFAULT_GROUP = ""
METRIC_STATES_KEY = "zoo_metric_states"
LOGGED_VALUES_KEY = "zoo_logged_epoch_values"
# ``self.log(reduce_fx=...)`` reductions whose running value can be checkpointed (Lightning parses the names)
_REDUCTIONS = {"mean": torch.mean, "sum": torch.sum, "max": torch.max, "min": torch.min}
#: The ``torch.compile`` keyword arguments a module's ``compile`` argument may give.
COMPILE_OPTIONS = ("mode", "fullgraph", "dynamic", "backend", "options")
#: Graphs Dynamo keeps per compiled function before it runs it eagerly instead (PyTorch's default: 8), raised to
#: this when a network is compiled: a network called for several tasks keeps one graph per task, in training and
#: evaluation, with static and then dynamic shapes (the multitask Transformer's 3 default tasks need 12).
RECOMPILE_LIMIT = 64


def compile_options(value: bool | dict | None) -> dict[str, Any] | None:
    """The ``torch.compile`` keyword arguments a family's ``compile`` argument stands for, checked.

    ``False``/``None``: ``None`` (the network stays eager); ``True``: ``{}`` (PyTorch's defaults: inductor,
    ``mode="default"``); a dict: its ``COMPILE_OPTIONS`` entries. Raises ``ZooError`` naming what is wrong, so a
    bad YAML value fails when the module is built rather than at the first training step.
    """
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if not isinstance(value, dict):
        raise ZooError(
            f"compile must be true, false or a dict of torch.compile options ({', '.join(COMPILE_OPTIONS)}), "
            f"got {value!r}"
        )
    unknown = sorted(set(value) - set(COMPILE_OPTIONS))
    if unknown:
        raise ZooError(
            f"compile has unknown options {unknown}: torch.compile takes {', '.join(COMPILE_OPTIONS)}"
        )
    if value.get("mode") is not None and value.get("options") is not None:
        raise ZooError("compile: give `mode` or `options`, not both (torch.compile accepts only one of them)")
    for key, kinds in (
        ("fullgraph", (bool,)),
        ("dynamic", (bool, type(None))),
        ("options", (dict, type(None))),
    ):
        if key in value and not isinstance(value[key], kinds):
            raise ZooError(
                f"compile: `{key}` must be {' or '.join(k.__name__ for k in kinds)}, got {value[key]!r}"
            )
    mode = value.get("mode")
    if mode is not None:
        from torch._inductor import list_mode_options

        modes = sorted(list_mode_options())
        if mode not in modes:
            raise ZooError(f"compile: unknown mode {mode!r}; torch.compile knows {modes}")
    backend = value.get("backend")
    if isinstance(backend, str):
        from torch._dynamo import list_backends

        backends = sorted(list_backends(exclude_tags=()))
        if backend not in backends:
            raise ZooError(f"compile: unknown backend {backend!r}; torch.compile knows {backends}")
    return dict(value)


class ZooModule(LightningModule):
    """Base class: hyper-parameters and hooks, optimizer/scheduler from YAML, per-stage metrics, sharding.

    Args:
        optimizer: a callable taking parameter groups (from YAML: ``class_path: AdamW`` with ``init_args``).
            Groups without ``weight_decay`` get the optimizer's own value.
        lr_scheduler: a callable taking the optimizer, stepped every optimizer step. A
            ``WarmupCosineLR`` left with ``total_steps: null`` is fitted to the whole run.

    A subclass lists its own arguments, then ``optimizer`` and ``lr_scheduler``, and calls
    ``super().__init__(optimizer, lr_scheduler)``; every other argument is saved as a hyper-parameter.
    A ``compile: bool | dict = False`` argument among them (every family has one) compiles ``self.model`` in
    ``configure_model`` (see ``compile_options``).
    """

    #: Repeated block types (e.g. a transformer layer class). FSDP2 shards each instance as a
    #: unit; ``FSDPStrategy`` / DeepSpeed configs read the same tuple for auto-wrap.
    sharding_units: ClassVar[tuple[type[nn.Module], ...]] = ()
    #: Names of frozen submodules called outside ``forward`` (a latent model's autoencoder): FSDP2 leaves their
    #: parameters whole on every rank, as nothing would gather them before those calls. A unit's own methods
    #: of that kind are listed in its ``fsdp_forward_methods`` instead, and are then gathered like ``forward``.
    replicated_modules: ClassVar[tuple[str, ...]] = ()
    #: Constructor arguments that are not hyper-parameters (callables, live objects).
    hparams_ignore: ClassVar[tuple[str, ...]] = ()
    #: Validation metrics shown in the progress bar (all of them when empty).
    progress_bar_metrics: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
    ) -> None:
        super().__init__()
        # Lightning collects the arguments of every ``__init__`` frame up the subclass chain.
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", *self.hparams_ignore])
        compile_options(self.hparams.get("compile"))  # a bad value fails here, not at the first step
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.metrics = nn.ModuleDict()
        self.configure_models()
        self.configure_losses()
        self._setup_metrics(self.configure_metrics())

    # ------------------------------------------------------------------ hooks
    def configure_models(self) -> None:
        """Build ``self.model`` (and any frozen parts) from ``self.hparams``."""

    def configure_losses(self) -> None:
        """Build loss modules (``self.criterion`` ...) from ``self.hparams``."""

    def configure_metrics(self) -> MetricCollection | dict[str, MetricCollection] | None:
        """The metrics to track: one collection, or one per group (task, output kind).

        A group's collection keeps its own ``prefix`` after the stage: ``{"roles": MetricCollection(...,
        prefix="roles/")}`` logs ``val/roles/token_acc``. Groups are cloned for every stage; a stage that
        never updates a group logs nothing for it.
        """
        return None

    def example_inputs(self, batch_size: int = 2) -> tuple[Any, ...]:
        """A small batch in ``forward``'s input format (positional arguments), for tracing and export."""
        raise NotImplementedError(f"{type(self).__name__} does not define example_inputs()")

    def export_graphs(self) -> list:
        """What ``zoo export --format pt2|onnx`` writes (``zoo.export.ExportGraph``): by default ``forward`` on
        ``example_inputs()`` with a dynamic batch. Families whose inference is several calls list each."""
        from zoo.export import default_graph

        return [default_graph(self, self.example_inputs, name="model")]

    def library_exports(self) -> dict:
        """Formats other libraries load (``{"timm": write(folder) -> [files]}``), for ``zoo export --format``."""
        return {}

    # ---------------------------------------------------------------- metrics
    def _setup_metrics(self, configured: MetricCollection | dict[str, MetricCollection] | None) -> None:
        if configured is None:
            return
        groups = configured if isinstance(configured, dict) else {DEFAULT_GROUP: configured}
        for group, collection in groups.items():
            if isinstance(collection, Metric):
                collection = MetricCollection({type(collection).__name__: collection})
            for stage in STAGES:  # "train" alone would clash with nn.Module.train
                prefix = f"{stage}/{collection.prefix or ''}"
                self.metrics[self._metrics_key(stage, group)] = collection.clone(prefix=prefix)

    @staticmethod
    def _metrics_key(stage: str, group: str = DEFAULT_GROUP) -> str:
        return f"{stage}_{group}_metrics" if group else f"{stage}_metrics"

    def stage_metrics(self, stage: str, group: str = DEFAULT_GROUP) -> MetricCollection | None:
        """The stage's collection of ``group``, or ``None`` when the module tracks no such metrics."""
        key = self._metrics_key(stage, group)
        return self.metrics[key] if key in self.metrics else None  # noqa: SIM401 (ModuleDict has no get)

    def update_metrics(self, stage: str, *args: Any, group: str = DEFAULT_GROUP, **kwargs: Any) -> None:
        """Update the stage's metrics of ``group``; they are computed and logged when the epoch ends."""
        collection = self.stage_metrics(stage, group)
        if collection is not None:
            collection.update(*args, **kwargs)

    def summarize_metrics(self, stage: str, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Derived epoch values (an average over tasks...) added to the computed metrics before logging."""
        return values

    def _log_stage_metrics(self, stage: str) -> None:
        keys = [key for key in self.metrics if key.startswith(f"{stage}_")]
        updated = torch.tensor(
            [any(getattr(m, "update_count", 0) for m in self.metrics[key].values()) for key in keys],
            dtype=torch.float32,
            device=self.device,
        )
        if self._trainer is not None and self.trainer.world_size > 1:
            # every rank computes the same groups: compute() is a collective, and a rank whose batches never
            # reached a group (another task's) must still take part in its synchronisation
            updated = self.trainer.strategy.reduce(updated, reduce_op="sum")
        values: dict[str, torch.Tensor] = {}
        for key, was_updated in zip(keys, updated.tolist()):
            collection = self.metrics[key]
            if was_updated:
                values.update(collection.compute())  # synchronised across ranks by torchmetrics
            collection.reset()
        if not values:
            return
        values = self.summarize_metrics(stage, values)
        shown = self.progress_bar_metrics
        on_bar = {k: v for k, v in values.items() if stage == "val" and (not shown or k in shown)}
        if on_bar:
            self.log_dict(on_bar, prog_bar=True, sync_dist=False)
        rest = {k: v for k, v in values.items() if k not in on_bar}
        if rest:
            self.log_dict(rest, sync_dist=False)

    def on_fit_start(self) -> None:
        """Fresh metric states: ones made under ``inference_mode`` (an earlier ``validate``) can't be updated in fit."""
        for collection in self.metrics.values():
            collection.reset()

    def on_train_start(self) -> None:
        """A run resumed mid-epoch gets back the training metrics' states of the batches it had seen. Not in
        ``on_fit_start``: FSDP2 and DeepSpeed load the checkpoint after that hook."""
        pending, self._pending_metric_states = getattr(self, "_pending_metric_states", None), None
        if pending:
            self._restore_metric_states(pending)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """A run resumed mid-epoch gets back, before its first batch logs, the epoch's running ``self.log``
        values of the batches it had seen (``_logged_epoch_values``). A subclass overriding this calls it."""
        pending, self._pending_logged_values = getattr(self, "_pending_logged_values", None), None
        if pending and self._trainer is not None:
            _restore_logged_epoch_values(self.trainer, pending)

    def _training_metrics(self):
        for key in self.metrics:
            if key.startswith("train_"):
                for name, metric in self.metrics[key].items(keep_base=True, copy_state=False):
                    yield f"{key}.{name}", metric

    def _metric_states(self) -> dict[str, Any]:
        """The training metrics' accumulated states (epoch-level values of a run killed mid-epoch): each rank's
        own (``ranks``), so a run resumed on as many processes adds its batches in the same order as the
        uninterrupted one, bit for bit; and their synchronised total (``merged``), restored on rank 0 alone
        when the run resumes on another number of processes, so the totals still count every batch once."""
        own, merged = {}, {}
        distributed = self._trainer is not None and self.trainer.world_size > 1
        for name, metric in self._training_metrics():
            own[name] = _metric_state(metric)
            if distributed and metric.update_count:
                metric.sync(should_sync=True, distributed_available=lambda: True)
            merged[name] = _metric_state(metric)
            if distributed and metric._is_synced:
                metric.unsync()
        if not distributed:
            return {"ranks": [own], "merged": merged}
        import torch.distributed as dist

        gathered: list[dict[str, Any] | None] = [None] * self.trainer.world_size
        dist.all_gather_object(gathered, own)  # every rank: Lightning dumps the checkpoint on all of them
        return {"ranks": gathered, "merged": merged}

    def _restore_metric_states(self, saved: dict[str, Any]) -> None:
        ranks = saved.get("ranks") or []
        world_size, rank = (
            (1, 0) if self._trainer is None else (self.trainer.world_size, self.trainer.global_rank)
        )
        if len(ranks) == world_size:
            self._load_metric_states(ranks[rank])
        elif rank == 0:  # another number of processes: rank 0 carries the total
            self._load_metric_states(saved.get("merged", saved))  # a flat dict: written before ``ranks``

    def _load_metric_states(self, states: dict[str, dict[str, Any]]) -> None:
        for name, metric in self._training_metrics():
            saved = states.get(name)
            if saved is None:
                continue
            metric._update_count = int(saved["update_count"])
            for state in metric._defaults:
                value = saved[state]
                moved = (
                    [v.to(self.device) for v in value] if isinstance(value, list) else value.to(self.device)
                )
                setattr(metric, state, moved)
            metric._computed = None

    def on_train_epoch_end(self) -> None:
        self._log_stage_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self._log_stage_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_stage_metrics("test")

    # -------------------------------------------------------------- optimizer
    def parameter_groups(self) -> list[dict]:
        """Parameter groups handed to the optimizer; override for layer-wise LR decay etc."""
        return weight_decay_groups(self)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameter_groups())
        apply_lr_scales(optimizer)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        if isinstance(scheduler, WarmupCosineLR) and scheduler.total_steps is None:
            scheduler.set_total_steps(int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------ checkpoints
    #: ``(old prefix, new prefix)`` renames of state-dict keys written by earlier versions of the module.
    state_dict_renames: ClassVar[tuple[tuple[str, str], ...]] = ()
    #: ``(old name, new name)`` renames of hyper-parameters (constructor arguments) of earlier versions.
    hparams_renames: ClassVar[tuple[tuple[str, str], ...]] = ()

    @classmethod
    def upgrade_hyperparameters(cls, hparams: dict[str, Any]) -> dict[str, Any]:
        """Hyper-parameters an earlier version saved, under today's argument names (in their order).

        ``hparams_renames`` by default; a family whose arguments moved further (into ``model_kwargs``) overrides
        it. Current hyper-parameters come back unchanged.
        """
        renames = dict(cls.hparams_renames)
        clashes = [old for old in renames if old in hparams and renames[old] in hparams]
        if clashes:
            raise ZooError(
                f"hyper-parameters hold both old and new names: {[(o, renames[o]) for o in clashes]}"
            )
        return {renames.get(key, key): value for key, value in hparams.items()}

    @classmethod
    def upgrade_checkpoint(cls, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """A shallow copy of a checkpoint written by an earlier version, with today's hyper-parameter names
        and state-dict keys (what ``zoo upgrade-checkpoint`` writes)."""
        upgraded = dict(checkpoint)
        if "hyper_parameters" in upgraded:
            upgraded["hyper_parameters"] = cls.upgrade_hyperparameters(dict(upgraded["hyper_parameters"]))
        if "state_dict" in upgraded:
            upgraded["state_dict"] = rename_keys(upgraded["state_dict"], cls.state_dict_renames)
        if "callbacks" in upgraded:  # copied one level deep: names are replaced, tensors shared
            upgraded["callbacks"] = {
                k: dict(v) if isinstance(v, dict) else v for k, v in upgraded["callbacks"].items()
            }
            rename_callback_states(upgraded, cls.state_dict_renames)
        return upgraded

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any):
        """Lightning's loader, for checkpoints of earlier versions too: one whose hyper-parameters carry old
        names is upgraded in memory first (Lightning would silently drop names ``__init__`` no longer takes and
        build the default architecture, or fail on them)."""
        if isinstance(checkpoint_path, (str, Path)) and Path(checkpoint_path).is_file():
            checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)
            saved = dict(checkpoint.get("hyper_parameters") or {})
            if cls.upgrade_hyperparameters(saved) != saved:
                buffer = io.BytesIO()
                torch.save(cls.upgrade_checkpoint(checkpoint), buffer)
                buffer.seek(0)
                checkpoint_path = buffer
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Adds the training metrics' states (outside ``state_dict``: weights files stay as they were)."""
        if self._trainer is not None and self.trainer.state.fn == "fit":
            checkpoint[METRIC_STATES_KEY] = self._metric_states()
            checkpoint[LOGGED_VALUES_KEY] = _logged_epoch_values(self.trainer)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Upgrade keys an earlier version wrote, then fail naming every differing, missing and unexpected
        entry at once (rather than PyTorch's first ``size mismatch``) when a trainer resumes or evaluates.

        Subclasses that edit ``checkpoint["state_dict"]`` (e.g. put back omitted frozen weights) call this last.
        ``Module.load_from_checkpoint`` without a trainer is left to ``load_state_dict`` and its ``strict`` flag.
        """
        self._pending_metric_states = checkpoint.get(METRIC_STATES_KEY)
        # resumed by a trainer: not into a later fresh fit of a module read with `load_from_checkpoint`
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        self._pending_logged_values = checkpoint.get(LOGGED_VALUES_KEY) if fitting else None
        if "state_dict" in checkpoint:
            checkpoint["state_dict"] = rename_keys(checkpoint["state_dict"], self.state_dict_renames)
            rename_callback_states(checkpoint, self.state_dict_renames)
        if self._trainer is None or not self.strict_loading or "state_dict" not in checkpoint:
            return
        from zoo.checkpointing import check_checkpoint_matches

        source = str(getattr(self.trainer, "ckpt_path", None) or "the checkpoint")
        check_checkpoint_matches(self.state_dict(), checkpoint["state_dict"], source)

    # --------------------------------------------------------------- sharding
    def configure_model(self) -> None:
        """Shard every ``sharding_units`` block, then the root, with FSDP2 under ``ModelParallelStrategy``; then,
        when a trainer sets the module up, compile ``self.model`` if the ``compile`` hyper-parameter asks
        (``compile_network``).

        A trainer calls this on every rank, before DDP wraps the module, and again at each ``fit``/``validate``/
        ``test``/``predict`` of the same module: compiling happens once. ``load_from_checkpoint`` calls it too,
        without a trainer: a loaded module stays eager (``zoo export`` traces it, ``zoo serve`` answers at once);
        ``compile_network()`` compiles it by hand.
        """
        self.shard_model()
        if self._trainer is not None:
            self.compile_network()

    def compiled_networks(self) -> list[nn.Module]:
        """The networks ``compile_network`` compiles: ``self.model`` by default. A family whose training runs
        other networks, or methods of its network rather than its ``forward``, lists those instead (the
        autoencoder's encoder and decoder, a ControlNet beside its UNet)."""
        network = getattr(self, "model", None)
        if not isinstance(network, nn.Module):
            raise ZooError(f"compile: {type(self).__name__} has no network in `self.model` to compile")
        return [network]

    def compile_network(self) -> None:
        """``network.compile(**options)`` for each of ``compiled_networks()``: the networks alone, in place, with
        the ``compile`` hyper-parameter's ``torch.compile`` options.

        In place (``nn.Module.compile``), not ``torch.compile(self.model)``: the module tree, parameter names and
        state-dict keys stay the network's (no ``_orig_mod.`` prefix), so checkpoints load into compiled and eager
        modules alike, and callbacks that hold parameters by name (``EMA``) or wrap the whole module (DDP, FSDP2,
        after sharding) see what they would without compiling. Only calls of a compiled network run compiled;
        its other methods (a ViT's ``forward_features``, a decoder's step) stay eager. Compiling is lazy: the
        first call of each new shape, mode (train/eval) and grad mode pays for it; Dynamo's per-function graph
        limit is raised to ``RECOMPILE_LIMIT`` (never lowered), as a multitask network needs more than 8.
        """
        options = compile_options(self.hparams.get("compile"))
        if options is None:
            return
        networks = [n for n in self.compiled_networks() if getattr(n, "_compiled_call_impl", None) is None]
        if not networks:  # compiled before
            return
        from lightning.pytorch.utilities import rank_zero_info

        shown = ", ".join(f"{k}={v!r}" for k, v in options.items())
        names = ", ".join(type(n).__name__ for n in networks)
        rank_zero_info(f"{type(self).__name__}: compiling {names} with torch.compile({shown})")
        import torch._dynamo.config as dynamo_config

        limit = (
            "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
        )  # torch < 2.6
        setattr(dynamo_config, limit, max(getattr(dynamo_config, limit), RECOMPILE_LIMIT))
        for network in networks:
            network.compile(**options)

    def sharded_submodules(self) -> list[nn.Module]:
        """The modules FSDP2 shards one at a time, in this order, before the root: every ``sharding_units``
        instance. FSDP2 gathers a unit's parameters for the unit's ``forward`` only, so a part that the network
        calls from outside its unit must come first, as a unit of its own (diffusers' DiT)."""
        return [module for module in self.modules() if isinstance(module, self.sharding_units)]

    def shard_model(self) -> None:
        """FSDP2 ``fully_shard`` of every ``sharding_units`` block and then the root, under ``ModelParallelStrategy``
        (nothing otherwise)."""
        mesh = self.device_mesh
        if mesh is None or not self.sharding_units:
            return
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        from zoo.strategies import materialize_parameters

        dp_mesh = mesh["data_parallel"] if mesh.mesh_dim_names else mesh
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        for module in self.sharded_submodules():
            # Built under ``zoo.strategies.empty_parameters``: one unit at a time is made real, initialised
            # and sharded, so a rank never holds more than its shards plus one full unit.
            materialize_parameters(module, device)
            fully_shard(module, mesh=dp_mesh)
            # methods besides forward that use the unit's parameters, e.g. a decoder's memory projection
            for method in getattr(module, "fsdp_forward_methods", ()):
                register_fsdp_forward_method(module, method)
        materialize_parameters(self, device)  # what no unit holds (embeddings, heads, final norm)
        whole = {p for name in self.replicated_modules for p in self.get_submodule(name).parameters()}
        fully_shard(self, mesh=dp_mesh, ignored_params=whole or None)
        # Lightning calls the step methods, not ``forward``: gather the root's own parameters for each step, as a
        # step may use them before any forward (a conditioning embedding, a task head's projection).
        for method in ("training_step", "validation_step", "test_step", "predict_step"):
            register_fsdp_forward_method(self, method)


def _logged_epoch_values(trainer) -> dict[str, Any]:
    """The running epoch aggregates of ``self.log(..., on_epoch=True)`` calls in training, when a checkpoint is
    written inside an epoch: Lightning keeps them in its result collection, which it does not checkpoint, so a
    run resumed mid-epoch would log ``train/loss_epoch`` over the resumed batches alone.

    ``{"ranks": [entries of rank 0, of rank 1, ...]}``, plain values (``torch.load(weights_only=True)`` reads
    them): under several processes every rank's own aggregates are gathered (one ``all_gather_object``), so a
    resume on as many processes gives each rank back its own (on another number, they start over)."""
    loop = trainer.fit_loop.epoch_loop
    progress = loop.batch_progress
    entries = []
    if not progress.is_last_batch and progress.current.processed:  # at an epoch's end the next starts empty
        for key, metric in loop._results.items():
            meta = metric.meta
            reduction = next((name for name, fn in _REDUCTIONS.items() if meta.reduce_fx is fn), None)
            if not metric.is_tensor or not meta.on_epoch or metric.has_reset or reduction is None:
                continue
            if meta.sync.group is not None:  # a process group cannot be written down
                continue
            entries.append(
                {
                    "key": key,
                    "fx": meta.fx,
                    "name": meta.name,
                    "prog_bar": meta.prog_bar,
                    "logger": meta.logger,
                    "on_step": meta.on_step,
                    "reduce_fx": reduction,
                    "enable_graph": meta.enable_graph,
                    "add_dataloader_idx": meta.add_dataloader_idx,
                    "dataloader_idx": meta.dataloader_idx,
                    "metric_attribute": meta.metric_attribute,
                    "sync_dist": meta.sync.should,
                    "rank_zero_only": meta.sync.rank_zero_only,
                    "value": metric.value.detach().cpu().clone(),
                    "cumulated_batch_size": (
                        metric.cumulated_batch_size.detach().cpu().clone() if reduction == "mean" else None
                    ),
                }
            )
    if trainer.world_size == 1:
        return {"ranks": [entries]}
    import torch.distributed as dist

    gathered: list[list[dict[str, Any]] | None] = [None] * trainer.world_size
    dist.all_gather_object(gathered, entries)  # every rank: Lightning dumps the checkpoint on all of them
    return {"ranks": [rank_entries or [] for rank_entries in gathered]}


def _restore_logged_epoch_values(trainer, saved: dict[str, Any]) -> None:
    """Puts the checkpoint's running ``self.log`` aggregates back into the training result collection, with the
    metadata ``LightningModule.log`` gives them, so the resumed batches' values add to them.

    Called at the first resumed batch's start: Lightning would clear the tensors of every hook that logs in an
    epoch's first batch (the collection then holds the previous epoch's), which this resumed batch is not."""
    from lightning.pytorch.trainer.connectors.logger_connector.result import _Metadata, _ResultMetric, _Sync

    ranks = saved.get("ranks") or []
    # resumed on another number of processes: the epoch's values start over
    entries = ranks[trainer.global_rank] if len(ranks) == trainer.world_size else []
    if not entries:
        return
    results = trainer.fit_loop.epoch_loop._results
    device = trainer.lightning_module.device
    for entry in entries:
        meta = _Metadata(
            fx=entry["fx"],
            name=entry["name"],
            prog_bar=entry["prog_bar"],
            logger=entry["logger"],
            on_step=entry["on_step"],
            on_epoch=True,
            reduce_fx=entry["reduce_fx"],
            enable_graph=entry["enable_graph"],
            add_dataloader_idx=entry["add_dataloader_idx"],
            dataloader_idx=entry["dataloader_idx"],
            metric_attribute=entry["metric_attribute"],
        )
        # as ``LightningModule.log`` makes it (on as many processes as when saved: the same ``sync.should``)
        meta.sync = _Sync(
            _should=entry["sync_dist"], fn=trainer.strategy.reduce, rank_zero_only=entry["rank_zero_only"]
        )
        metric = _ResultMetric(meta, is_tensor=True)
        metric.value = entry["value"].to(device)
        if entry["cumulated_batch_size"] is not None:
            metric.cumulated_batch_size = entry["cumulated_batch_size"].to(device)
        metric.has_reset = False
        results[entry["key"]] = metric
    trainer._logger_connector._first_loop_iter = False


def _metric_state(metric: Metric) -> dict[str, Any]:
    """A torchmetrics ``Metric``'s accumulated state."""
    return {
        "update_count": metric.update_count,
        **{state: _detached(getattr(metric, state)) for state in metric._defaults},
    }


def _detached(value):
    """Detached CPU copies: gathered from every rank into rank 0's checkpoint, whatever their device."""
    return (
        [v.detach().cpu().clone() for v in value] if isinstance(value, list) else value.detach().cpu().clone()
    )


def rename_keys(state: dict[str, Any], renames: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """``state`` with every key starting with an old prefix moved to the new one (order kept)."""
    renames = tuple(renames)
    if not renames:
        return state
    out = {}
    for key, value in state.items():
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    return out


def rename_callback_states(checkpoint: dict[str, Any], renames: Iterable[tuple[str, str]]) -> None:
    """Rename, in place, the parameter names ``zoo.callbacks.EMA`` keeps in a checkpoint's callback states."""
    renames = tuple(renames)
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if renames and str(key).startswith("EMA") and isinstance(state, dict) and "names" in state:
            state["names"] = list(rename_keys(dict.fromkeys(state["names"]), renames))
