"""What every family's LightningModule shares, written once.

Modelled on torchgeo's ``BaseTask``: a family subclass builds its networks in ``__init__``,
declares its metrics in ``configure_metrics`` and its repeated blocks in ``sharding_units``;
this class turns the optimizer and scheduler given in YAML into ``configure_optimizers``,
keeps one metric collection per stage, and shards the model under FSDP2.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MetricCollection

from zoo.optim import WarmupCosineLR, apply_lr_scales, weight_decay_groups

__all__ = ["STAGES", "ZooModule"]

STAGES = ("train", "val", "test")


class ZooModule(LightningModule):
    """Base class: optimizer/scheduler from YAML, per-stage metrics, FSDP2 sharding.

    Args:
        optimizer: a callable taking parameter groups (from YAML: ``class_path: torch.optim.AdamW``
            with ``init_args``). Groups without ``weight_decay`` get the optimizer's own value.
        lr_scheduler: a callable taking the optimizer, stepped every optimizer step. A
            ``WarmupCosineLR`` left with ``total_steps: null`` is fitted to the whole run.
    """

    #: Repeated block types (e.g. a transformer layer class). FSDP2 shards each instance as a
    #: unit; ``FSDPStrategy`` / DeepSpeed configs read the same tuple for auto-wrap.
    sharding_units: ClassVar[tuple[type[nn.Module], ...]] = ()
    #: Names of frozen submodules called outside ``forward`` (a latent model's autoencoder): FSDP2 leaves their
    #: parameters whole on every rank, as nothing would gather them before those calls. A unit's own methods
    #: of that kind are listed in its ``fsdp_forward_methods`` instead, and are then gathered like ``forward``.
    replicated_modules: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
    ) -> None:
        super().__init__()
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.metrics = nn.ModuleDict()

    # ----------------------------------------------------------------- metrics
    def configure_metrics(self) -> MetricCollection | None:
        """Return the metric collection to track; cloned once per stage (``train/``, ``val/``...)."""
        return None

    def setup_metrics(self) -> None:
        """Call at the end of a subclass ``__init__``, once the metric arguments are known."""
        template = self.configure_metrics()
        if template is None:
            return
        for stage in STAGES:  # keyed "<stage>_metrics": "train" would clash with nn.Module.train
            self.metrics[f"{stage}_metrics"] = template.clone(prefix=f"{stage}/")

    def on_fit_start(self) -> None:
        """Fresh metric states: ones made under ``inference_mode`` (an earlier ``validate``) can't be updated in fit."""
        for collection in self.metrics.values():
            collection.reset()

    def update_metrics(self, stage: str, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Update the stage's metrics and log them (epoch-level, synchronised across ranks)."""
        key = f"{stage}_metrics"
        if key not in self.metrics:
            return
        collection = self.metrics[key]
        collection.update(preds, target)
        self.log_dict(collection, on_step=False, on_epoch=True, sync_dist=True, prog_bar=stage == "val")

    # --------------------------------------------------------------- optimizer
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

    # ------------------------------------------------------------- checkpoints
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A trainer resuming from (or evaluating) a checkpoint of another model fails here, naming every
        differing, missing and unexpected entry at once rather than PyTorch's first ``size mismatch``.

        Subclasses that edit ``checkpoint["state_dict"]`` (e.g. put back omitted frozen weights) call this last.
        ``Module.load_from_checkpoint`` without a trainer is left to ``load_state_dict`` and its ``strict`` flag.
        """
        if self._trainer is None or not self.strict_loading or "state_dict" not in checkpoint:
            return
        from zoo.checkpointing import check_checkpoint_matches

        source = str(getattr(self.trainer, "ckpt_path", None) or "the checkpoint")
        check_checkpoint_matches(self.state_dict(), checkpoint["state_dict"], source)

    # ---------------------------------------------------------------- sharding
    def configure_model(self) -> None:
        """Shard every ``sharding_units`` block, then the root, with FSDP2 under ``ModelParallelStrategy``."""
        mesh = self.device_mesh
        if mesh is None or not self.sharding_units:
            return
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        from zoo.strategies import materialize_parameters

        dp_mesh = mesh["data_parallel"] if mesh.mesh_dim_names else mesh
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        for module in self.modules():
            if isinstance(module, self.sharding_units):
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
