"""A trained model and its data module, outside a Trainer: what ``zoo export`` and ``zoo serve`` start from.

Both commands take the arguments ``zoo predict`` takes (``--config`` files, ``--ckpt_path``, ``--model.*`` /
``--data.*`` overrides), so the model is built exactly as ``zoo predict`` builds it: the zoo's CLI parses the
config, merges the checkpoint's hyper-parameters (upgraded by the model class) and feeds the data module's
links into the model. The weights are then loaded as Lightning loads them, through the module's
``on_load_checkpoint`` (renamed keys of earlier versions, frozen parts a checkpoint omits), with compression
records (pruning, quantization, weight sharing) replayed first, so a compressed checkpoint loads too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lightning.pytorch import LightningDataModule, LightningModule

from zoo.checkpointing import CheckpointError, load_checkpoint_file
from zoo.cli import ZooCLI, prepare_arguments
from zoo.errors import MissingFileError

__all__ = ["ConfiguredData", "TrainedModel", "load_data_module", "load_trained_model", "load_weights"]


@dataclass
class TrainedModel:
    """A model in eval mode with its weights loaded, and the data module of its config (set up to predict)."""

    module: LightningModule
    datamodule: LightningDataModule | None
    checkpoint: str | None

    @property
    def name(self) -> str:
        return type(self.module).__name__


def load_trained_model(config_args: Sequence[str], ckpt_path: str | None) -> TrainedModel:
    """Build the model and data of ``config_args`` (``["--config", "x.yaml", "--data.init_args...", ...]``) and
    load ``ckpt_path`` into the model (``None``: the config's own initial weights, e.g. for a smoke test)."""
    if ckpt_path is not None:
        path = Path(ckpt_path)
        if not path.exists():
            raise MissingFileError(f"--ckpt_path {ckpt_path}: no such file")
        if path.is_dir():
            raise CheckpointError(
                f"{ckpt_path} is a sharded checkpoint (FSDP/DeepSpeed): merge it into one file with "
                f"`zoo consolidate {ckpt_path} model.ckpt`, then pass that file"
            )
    args = ["predict", *config_args, "--trainer.logger=false", "--trainer.enable_progress_bar=false"]
    if ckpt_path is not None:
        args += ["--ckpt_path", str(ckpt_path)]
    cli = _BuildOnlyCLI(args=prepare_arguments(args))
    module = cli.model
    if ckpt_path is not None:
        load_weights(module, ckpt_path)
    module.eval()
    datamodule = cli.datamodule
    if datamodule is not None:
        datamodule.setup("predict")
    return TrainedModel(module, datamodule, None if ckpt_path is None else str(ckpt_path))


def load_weights(module: LightningModule, ckpt_path: str | Path) -> None:
    """Load a single-file checkpoint into ``module`` as a Trainer would, compression records replayed first."""
    from zoo.callbacks.compression.records import CHECKPOINT_KEY, replay, size_observers_like

    checkpoint = load_checkpoint_file(ckpt_path, weights_only=True)
    if "state_dict" not in checkpoint:
        raise CheckpointError(f"{ckpt_path} holds no 'state_dict': it is not a Lightning checkpoint")
    records = checkpoint.get(CHECKPOINT_KEY) or []
    if records:
        replay(module, records)
        size_observers_like(module, checkpoint["state_dict"])
    module.on_load_checkpoint(checkpoint)
    try:
        module.load_state_dict(checkpoint["state_dict"], strict=module.strict_loading)
    except RuntimeError as error:
        raise CheckpointError(
            f"{ckpt_path} does not fit {type(module).__name__} as configured: {error}"
        ) from error


@dataclass
class ConfiguredData:
    """A config's data module (set up to predict) and its model's configuration, the model not built."""

    datamodule: LightningDataModule | None
    model_name: str
    model_config: dict  # the config's ``model`` part: class_path, init_args, a checkpoint's dict_kwargs


def load_data_module(config_args: Sequence[str], ckpt_path: str | None = None) -> ConfiguredData:
    """The data module of ``config_args`` set up to predict and the model's configuration (with ``ckpt_path``'s
    hyper-parameters merged, as ``zoo predict`` merges them), without building the model: a server's HTTP
    process checks requests with these alone."""
    args = ["predict", *config_args, "--trainer.logger=false"]
    if ckpt_path is not None:
        args += ["--ckpt_path", str(ckpt_path)]
    cli = _DataOnlyCLI(args=prepare_arguments(args))
    if cli.datamodule is not None:
        cli.datamodule.setup("predict")
    return ConfiguredData(cli.datamodule, cli.model_name, cli.model_config)


class _BuildOnlyCLI(ZooCLI):
    """The zoo's CLI stopped once it built the model, data and trainer (``predict`` reads the checkpoint)."""

    def _run_subcommand(self, subcommand: str) -> None:
        return None


class _DataOnlyCLI(_BuildOnlyCLI):
    """The zoo's CLI stopped once it parsed the config and built the data module."""

    def instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        self.datamodule = self._instantiate_data(config)
        model = config.get("model")
        self.model_name = str(model.class_path).rsplit(".", 1)[-1] if model else "model"
        self.model_config = model.as_dict() if model is not None else {}
