"""The ``zoo`` command: a ``LightningCLI`` whose models and data modules are chosen in YAML.

``zoo fit --config configs/vision/deit_tiny.yaml`` trains; further ``--config`` files compose
(``--config configs/strategy/ddp.yaml``) and ``--trainer.max_epochs=3`` style flags override.
Model and data are in subclass mode, so a YAML file names any LightningModule /
LightningDataModule by class path, or by short name for the zoo's own classes. Values the data
determines are linked into the model, so a user never writes them twice.
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

# Imported for their side effect: registering the zoo's classes so YAML can use short names.
import zoo.bev
import zoo.callbacks
import zoo.datamodules
import zoo.diffusion
import zoo.multitask
import zoo.protein
import zoo.vision  # noqa: F401

__all__ = ["DATA_TO_MODEL_LINKS", "ZooCLI", "main"]

#: ``(data module attribute, model argument)`` pairs. A link whose source the data module lacks is skipped;
#: one whose target the model lacks still reaches it as an extra keyword (jsonargparse's ``dict_kwargs``),
#: so a family's source attribute needs a name no other family's data module has (``detection_classes``).
DATA_TO_MODEL_LINKS: tuple[tuple[str, str], ...] = (
    ("num_classes", "num_classes"),
    ("image_size", "img_size"),
    ("tasks", "tasks"),
    ("vocab_size", "vocab_size"),
    ("caption_vocabulary", "caption_vocabulary"),
    ("detection_classes", "class_names"),
    ("point_cloud_range", "point_cloud_range"),
)


class ZooCLI(LightningCLI):
    """``LightningCLI`` with subclass mode, the data-to-model links and a report of where outputs went."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        # Checkpoints are written atomically (zoo.checkpointing.AtomicCheckpointIO) unless a config names plugins.
        kwargs.setdefault(
            "trainer_defaults",
            {"default_root_dir": "runs", "plugins": [{"class_path": "zoo.checkpointing.AtomicCheckpointIO"}]},
        )
        super().__init__(LightningModule, LightningDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        for source, target in DATA_TO_MODEL_LINKS:
            parser.link_arguments(f"data.{source}", f"model.init_args.{target}", apply_on="instantiate")

    def after_fit(self) -> None:
        self._report_outputs()

    def _report_outputs(self) -> None:
        trainer = self.trainer
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if not trainer.is_global_zero:
            return
        lines = []
        if log_dir:
            lines.append(f"logs and config: {log_dir}")
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None:
            best = getattr(checkpoint, "best_model_path", "") or getattr(checkpoint, "last_model_path", "")
            if best:
                lines.append(f"best checkpoint: {best}")
            if getattr(checkpoint, "dirpath", None):
                lines.append(f"checkpoints:     {checkpoint.dirpath}")
        if lines:
            print("\n".join(["", "zoo: outputs written", *("  " + line for line in lines)]), flush=True)


def main(args: list[str] | None = None) -> None:
    """Console entry point (``zoo`` and ``python -m zoo``)."""
    ZooCLI(args=args)


if __name__ == "__main__":
    main()
