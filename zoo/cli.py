"""The ``zoo`` command: a ``LightningCLI`` whose models and data modules are chosen in YAML.

``zoo fit --config configs/vision/deit_tiny.yaml`` trains; further ``--config`` files compose
(``--config configs/strategy/ddp.yaml``) and ``--trainer.max_epochs=3`` style flags override.
Model and data are in subclass mode, so a YAML file names any LightningModule /
LightningDataModule by class path, or by short name for the zoo's own classes.

Two things the zoo adds to Lightning's CLI:

- Overlays: a config may start with ``extends: base.yaml`` (a path relative to that file, or a list of
  them); the base is read first and the overlay's keys win, as if both were given with ``--config``.
- Data-to-model links owned by the data: a data module's ``model_links`` (``{attribute: model
  argument}``) feed values the data determines into the model, for each argument the chosen model's
  ``__init__`` takes; a model without that argument never sees it.
- Exact resume by default (``zoo.resume``): every ``zoo fit`` writes ``last.ckpt`` every
  ``--resume.every_n_train_steps`` optimizer steps, at validation ends and on ``SIGTERM``/``SIGUSR1``, with
  the generator states; ``--ckpt_path last`` picks the newest run's ``last.ckpt`` and a fit resumed from a
  run's checkpoint goes on logging and checkpointing in that run's folder.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml
from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import Logger, TensorBoardLogger

from zoo.checkpointing import CheckpointError, load_checkpoint_file
from zoo.errors import MissingFileError
from zoo.loggers import ResumableCSVLogger
from zoo.predict import RecordPredictionWriter
from zoo.progress import ZooModelSummary, ZooProgressBar, fit_summary
from zoo.registry import import_class, import_named_classes, resolve_config
from zoo.resume import ResumeCheckpoint, ResumeState, find_last_checkpoint
from zoo.threads import choose_threads

__all__ = ["ZooCLI", "expand_overlays", "linked_model_arguments", "prepare_arguments", "run"]

OVERLAY_KEY = "extends"


def prepare_arguments(args: Sequence[str]) -> list[str]:
    """Command-line arguments as LightningCLI reads them: configs named by model (``--config deit_tiny``) or
    by path inside the shipped ``configs/`` resolved, overlays expanded, and the zoo families they name
    imported (families load on demand, so ``zoo`` starts in the time Lightning takes)."""
    resolved = list(args)
    for i, arg in enumerate(resolved):
        if i and resolved[i - 1] == "--config":
            resolved[i] = resolve_config(arg)
        elif arg.startswith("--config="):
            resolved[i] = "--config=" + resolve_config(arg.split("=", 1)[1])
    expanded = expand_overlays(resolved)
    configs = [expanded[i + 1] for i, arg in enumerate(expanded[:-1]) if arg == "--config"]
    import_named_classes(expanded, configs)
    if len(expanded) > len(resolved):  # bases were read: a printed or saved config is complete without them
        expanded.append(f"--{OVERLAY_KEY}=null")
    return expanded


def expand_overlays(args: Sequence[str]) -> list[str]:
    """``--config overlay.yaml`` -> ``--config base.yaml --config overlay.yaml`` for each ``extends`` (recursively)."""
    expanded: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config" and i + 1 < len(args):
            expanded += [item for path in _with_bases(args[i + 1]) for item in ("--config", path)]
            i += 2
            continue
        if arg.startswith("--config="):
            expanded += [item for path in _with_bases(arg.split("=", 1)[1]) for item in ("--config", path)]
        else:
            expanded.append(arg)
        i += 1
    return expanded


def _with_bases(config: str, seen: tuple[Path, ...] = ()) -> list[str]:
    path = Path(config)
    if not path.is_file() or path.suffix not in (".yaml", ".yml"):
        return [config]  # a YAML string or something jsonargparse will report
    resolved = path.resolve()
    if resolved in seen:
        chain = " -> ".join(str(p) for p in (*seen, resolved))
        raise ValueError(f"config overlays form a cycle: {chain}")
    content = yaml.safe_load(path.read_text()) or {}
    bases = content.get(OVERLAY_KEY) if isinstance(content, dict) else None
    if bases is None:
        return [config]
    chain: list[str] = []
    for base in [bases] if isinstance(bases, str) else bases:
        base_path = path.parent / base
        if not base_path.is_file():
            raise FileNotFoundError(f"{config}: '{OVERLAY_KEY}: {base}' names no file ({base_path})")
        chain += _with_bases(str(base_path), (*seen, resolved))
    return [*chain, config]


def linked_model_arguments(datamodule: LightningDataModule, model_class: type) -> dict[str, object]:
    """The values ``datamodule.model_links`` feeds into ``model_class``, only for arguments it takes."""
    links = getattr(datamodule, "model_links", None) or {}
    accepted = inspect.signature(model_class.__init__).parameters
    return {target: getattr(datamodule, source) for source, target in links.items() if target in accepted}


class ZooCLI(LightningCLI):
    """``LightningCLI`` with subclass mode, overlays, data-owned links and a report of where outputs went."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        # Checkpoints are written atomically (zoo.checkpointing.AtomicCheckpointIO) unless a config names plugins.
        kwargs.setdefault(
            "trainer_defaults",
            {
                "default_root_dir": "runs",
                "plugins": [{"class_path": "zoo.checkpointing.AtomicCheckpointIO"}],
            },
        )
        self._started = time.perf_counter()
        self._resume_step: int | None = None
        command_line = kwargs.pop("args", None)
        if command_line is None and not args:
            command_line = sys.argv[1:]
        if isinstance(command_line, Sequence) and not isinstance(command_line, str):
            command_line = prepare_arguments(command_line)
        super().__init__(LightningModule, LightningDataModule, *args, args=command_line, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            f"--{OVERLAY_KEY}",
            type=str | list[str] | None,
            default=None,
            help="Base config(s) of an overlay, relative to it; read first (resolved before parsing).",
        )
        # ``--resume.every_n_train_steps``: added to every fit's callbacks (``_instantiate_trainer``), not listed
        parser.add_class_arguments(ResumeCheckpoint, "resume", fail_untyped=False)

    def parse_arguments(self, parser, args) -> None:
        """Lightning's, without its warning about ``args`` next to ``sys.argv``: the zoo always passes the
        prepared command line as ``args``."""
        self.config = (
            parser.parse_object(args) if isinstance(args, (dict, Namespace)) else parser.parse_args(args)
        )

    def _parse_ckpt_path(self) -> None:
        """Lightning merges a ``--ckpt_path`` checkpoint's hyper-parameters into the model's config; here
        ``last`` names the newest ``last.ckpt`` under the root directory, an unusable file or one written by
        another model is the zoo's error naming it, and hyper-parameters are upgraded by the model class first,
        so checkpoints of earlier versions evaluate and resume too."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path:
            return
        if ckpt_path == "last":
            root = self.config[subcommand].trainer.get("default_root_dir") or "runs"
            found = find_last_checkpoint(root)
            if found is None:
                raise MissingFileError(
                    f"--ckpt_path last: no run under {str(root)!r} has a checkpoints/last.ckpt to resume; "
                    "start without --ckpt_path, or give the checkpoint's path"
                )
            ckpt_path = self.config[subcommand].ckpt_path = str(found)
        if not Path(ckpt_path).exists():
            raise MissingFileError(f"--ckpt_path {ckpt_path}: no such file")
        if not Path(ckpt_path).is_file():
            return  # a sharded checkpoint directory: Lightning's strategy reads it
        checkpoint = load_checkpoint_file(ckpt_path, weights_only=True)
        self._resume_step = checkpoint.get("global_step")
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        class_path = hparams.pop("_class_path", None)
        if class_path is not None:
            model_class = import_class(class_path)
            _check_same_model(ckpt_path, model_class, self.config[subcommand].get("model"))
            if hasattr(model_class, "upgrade_hyperparameters"):
                hparams = model_class.upgrade_hyperparameters(hparams)
            hparams = {"class_path": class_path, "dict_kwargs": hparams}
        self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def instantiate_classes(self) -> None:
        """Build the data module first, feed its ``model_links`` into the model's arguments, then the rest."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        config[OVERLAY_KEY] = None  # already applied: the saved config.yaml is complete without its bases
        datamodule = self._instantiate_data(config)
        if datamodule is not None and config.get("model") is not None:
            model_class = import_class(config.model.class_path)
            for name, value in linked_model_arguments(datamodule, model_class).items():
                config.model.init_args[name] = value
        instantiators = (
            [] if datamodule is None else [(lambda *_, **__: datamodule, LightningDataModule, True)]
        )
        self.config_init = self.parser.instantiate(self.config, instantiators=instantiators)
        self.datamodule = self._get(self.config_init, "data")
        self.model = self._get(self.config_init, "model")
        self._add_configure_optimizers_method_to_model(self.subcommand)
        self.trainer = self.instantiate_trainer()

    @staticmethod
    def _instantiate_data(config: Namespace) -> LightningDataModule | None:
        if config.get("data") is None:
            return None
        init_args = config.data.get("init_args") or Namespace()
        if not any(isinstance(v, Namespace) for v in vars(init_args).values()):
            # plain, already type-checked arguments: call the class, so its own errors reach the user unwrapped
            return import_class(config.data.class_path)(**vars(init_args))
        parser = ArgumentParser(exit_on_error=False)
        parser.add_subclass_arguments(LightningDataModule, "data")
        return parser.instantiate(parser.parse_object({"data": config.data.as_dict()})).data

    def _instantiate_trainer(self, config: dict, callbacks: list):
        """The zoo's progress bar and default logger; validate/test/predict log inside the checkpoint's run
        (``<run>/validate/version_N``); ``zoo predict`` writes every family's records unless a config names a
        writer."""
        if config.get("logger") in (None, True):  # Lightning's default, chosen here without its warning
            config["logger"] = _default_logger(config.get("default_root_dir") or "runs")
            self._default_logger_chosen = True
        configured = [*callbacks, *(config.get("callbacks") or [])]
        if config.get("enable_progress_bar", True) is not False and not any(
            isinstance(c, ProgressBar) for c in configured
        ):
            callbacks = [*callbacks, ZooProgressBar()]
        if config.get("enable_model_summary", True) is not False and not any(
            isinstance(c, ModelSummary) for c in configured
        ):
            callbacks = [*callbacks, ZooModelSummary()]
        ckpt_path = self.config[self.subcommand].get("ckpt_path") if self.subcommand else None
        run = _run_folder(ckpt_path)
        if self.subcommand == "fit":
            if run is not None and self._logs_by_default(config):  # the resumed run goes on in its folder
                config["logger"] = _default_logger(
                    run.parent.parent, run.parent.name, version=run.name, resume_step=self._resume_step
                )
            callbacks = [
                *callbacks,
                *_fit_callbacks(config, configured, self._get(self.config_init, "resume")),
            ]
        if self.subcommand in ("validate", "test", "predict"):
            if run is not None and config.get("logger"):
                config["logger"] = _default_logger(run, name=self.subcommand)
            for callback in configured:  # they save nothing here: point them where the fit saved, as it did
                if isinstance(callback, ModelCheckpoint) and callback.dirpath is None and ckpt_path:
                    callback.dirpath = str(Path(ckpt_path).parent)
        if self.subcommand == "predict" and not any(isinstance(c, BasePredictionWriter) for c in configured):
            callbacks = [*callbacks, RecordPredictionWriter()]
        return super()._instantiate_trainer(config, callbacks)

    def _logs_by_default(self, config: dict) -> bool:
        return getattr(self, "_default_logger_chosen", False) and config.get("logger") is not False

    def after_fit(self) -> None:
        summary = fit_summary(
            self.trainer, time.perf_counter() - self._started
        )  # every rank: log_dir is a collective
        if self.trainer.is_global_zero:
            print("\n" + summary, flush=True)


def _default_logger(
    save_dir: str | Path,
    name: str = "lightning_logs",
    version: str | None = None,
    resume_step: int | None = None,
) -> Logger:
    """TensorBoard when it is installed, else CSV files: Lightning's choice, made without its warning. A resumed
    run continues its log from the checkpoint (TensorBoard drops the later events, the CSV file its rows)."""
    if importlib.util.find_spec("tensorboard"):
        return TensorBoardLogger(save_dir=save_dir, name=name, version=version, purge_step=resume_step)
    return ResumableCSVLogger(save_dir=save_dir, name=name, version=version)


def _fit_callbacks(config: dict, configured: list, resume: ResumeCheckpoint) -> list:
    """What every fit adds unless the config has its own: throughput and MFU (``zoo.callbacks``), and, unless
    checkpointing is off, what resuming exactly needs."""
    from zoo.callbacks.throughput import ThroughputMonitor

    added = [] if any(isinstance(c, ThroughputMonitor) for c in configured) else [ThroughputMonitor()]
    if config.get("enable_checkpointing") is False:
        return added
    if not any(isinstance(c, ResumeCheckpoint) for c in configured):
        added.append(resume)
    if not any(isinstance(c, ResumeState) for c in configured):
        added.append(ResumeState())
    return added


def _check_same_model(ckpt_path: str, written_by: type, configured: Namespace | None) -> None:
    """A checkpoint of another model class is an error naming both, before anything is built from it."""
    if configured is None or not configured.get("class_path"):
        return
    model_class = import_class(configured.class_path)
    if not (issubclass(written_by, model_class) or issubclass(model_class, written_by)):
        raise CheckpointError(
            f"{ckpt_path} holds a {written_by.__name__} checkpoint, but the config trains a "
            f"{model_class.__name__}: pass that model's config, or a checkpoint this model wrote"
        )


def _run_folder(ckpt_path: str | None) -> Path | None:
    """``runs/lightning_logs/version_3`` for ``runs/lightning_logs/version_3/checkpoints/last.ckpt``."""
    if not ckpt_path:
        return None
    path = Path(ckpt_path)
    if path.parent.name == "checkpoints" and (path.parent.parent / "config.yaml").is_file():
        return path.parent.parent
    return None


def run(args: list[str]) -> None:
    """``zoo fit|validate|test|predict ...`` (the ``zoo`` command, ``zoo.commands``, dispatches here), with
    PyTorch's CPU threads on the free cores unless ``OMP_NUM_THREADS`` is set (``zoo.threads``)."""
    choose_threads()
    try:
        ZooCLI(args=args)
    finally:
        # tear down gloo/NCCL before the interpreter does: left to exit, gloo's threads can abort the process
        # ("terminate called without an active exception") after a finished multi-process run
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
