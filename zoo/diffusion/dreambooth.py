"""DreamBooth (Ruiz et al. 2023): fine-tune a trained class-conditional model on a few images of one instance.

The instance (3 to 8 pictures: ``zoo.datamodules.InstanceImageDataModule``) is bound to an *identifier*, here
a new class id: every class table of the model (the conditioner's token, the UNet's class embedding or DiT's
label table) grows by one row (``zoo.diffusion.embeddings.ExtendedEmbedding``), placed after the null class
so that the base's labels and its null condition keep their ids. The row starts at the mean of the rows of
``class_labels``, the plain class the instance belongs to (DreamBooth's "sks dog" starts from "dog"). The
whole model then trains (or LoRA adapters, ``lora: {rank: 4}``, with the identifier rows) on the instance.

Fine-tuning on five images pulls the whole model towards them ("language drift": samples of the plain class
start to look like the instance). Prior preservation counters it: before training, the frozen starting model
draws ``prior.num_images`` samples of ``class_labels`` (``zoo.diffusion.prior_images``, cached on disk), and
each training batch is the instance batch plus as many of these class images, in one denoiser call; the loss
is the instance MSE plus ``prior.weight`` x the class-image MSE, each averaged over its half. Condition
dropout is off: the null condition is the base's, not retrained on the instance. The class images are saved
in the checkpoint, so a resumed run trains on the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from zoo.diffusion.conditioning import ClassConditioner
from zoo.diffusion.embeddings import ExtendedEmbedding, extend_embedding
from zoo.diffusion.module import LatentDiffusion
from zoo.parts import plain_part, resolve_part

__all__ = ["DreamBooth", "PriorPreservation"]


@dataclass(frozen=True)
class PriorPreservation:
    """The prior-preservation loss of DreamBooth.

    Args:
        num_images: class images drawn by the starting model (DreamBooth's script: 100; its paper ~1000).
        weight: the class-image loss's weight against the instance loss (``prior_loss_weight``; 1 in the paper).
        cache_dir: where the class images are kept, named by a hash of the model and what was asked;
            ``None``: ``<trainer's default_root_dir>/class_images``.
        seed: the seed of their sampling.
    """

    num_images: int = 100
    weight: float = 1.0
    cache_dir: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_images < 1:
            raise ValueError(f"prior.num_images must be >= 1, got {self.num_images}")
        if self.weight < 0:
            raise ValueError(f"prior.weight must be >= 0, got {self.weight}")


class DreamBooth(LatentDiffusion):
    """``LatentDiffusion`` fine-tuned on an instance bound to a new class id (see the module docstring).

    Args:
        class_labels: the plain class(es) of the instance (e.g. the circles for a yellow circle): the
            identifier starts at their mean class embedding, and prior preservation draws them.
        prior: ``PriorPreservation``, or ``None`` to train on the instance alone.
        base_checkpoint: the trained class-conditional ``LatentDiffusion`` to personalise (``None``: an
            untrained one, for smoke runs).
        img_size / num_classes / caption_vocabulary: what the data module links; ``num_classes`` is the base's.
        All other arguments are ``LatentDiffusion``'s parts (they must match the base checkpoint's).
    """

    parts = {**LatentDiffusion.parts, "prior": PriorPreservation}

    def __init__(
        self,
        class_labels: list[int] | None = None,
        prior: PriorPreservation | None = PriorPreservation(),
        img_size: int = 32,
        num_classes: int = 0,
        caption_vocabulary: list[str] | None = None,
        **kwargs,
    ) -> None:
        if not class_labels:
            raise ValueError("DreamBooth needs class_labels: the plain class(es) the instance belongs to")
        prior = plain_part(prior, PriorPreservation)
        # the parts as plain data here too: Lightning saves this frame's arguments over LatentDiffusion's
        kwargs = {k: plain_part(v, self.parts[k]) if k in self.parts else v for k, v in kwargs.items()}
        super().__init__(
            img_size=img_size, num_classes=num_classes, caption_vocabulary=caption_vocabulary, **kwargs
        )

    def configure_models(self) -> None:
        super().configure_models()
        self.prior = resolve_part(self.hparams.prior, PriorPreservation)
        if not isinstance(self.conditioner, ClassConditioner):
            raise ValueError(
                "DreamBooth binds the instance to a new class id: it needs ClassConditioning "
                "(for a caption model, learn a new word with TextualInversion)"
            )
        num_classes = self.conditioner.num_classes
        labels = list(self.hparams.class_labels)
        bad = [label for label in labels if not 0 <= label < num_classes]
        if bad:
            raise ValueError(f"class_labels {bad} are not classes of the model (0 to {num_classes - 1})")
        for name in class_tables(self, num_classes):
            table = self.get_submodule(name)
            extend_embedding(self, name, table.weight.detach()[labels].mean(0, keepdim=True))
        self.identifier_label = num_classes + 1
        self._prior_images: torch.Tensor | None = None  # uint8 (N, 3, H, W), drawn at fit start
        self._prior_labels: torch.Tensor | None = None
        self._prior_key: str | None = None

    # -------------------------------------------------------------- instance
    def condition(self, batch: dict, dropout: float = 0.0, generator: torch.Generator | None = None):
        """Label -1 (the instance data's "no class of the base") is the identifier."""
        labels = torch.as_tensor(batch["label"])
        batch = {**batch, "label": torch.where(labels < 0, self.identifier_label, labels)}
        return super().condition(batch, dropout, generator)

    # ----------------------------------------------------------------- prior
    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.prior is None or self._prior_images is not None:  # resumed: the checkpoint's class images
            return
        from zoo.diffusion.prior_images import class_images

        trainer = self.trainer
        labels, prior = list(self.hparams.class_labels), self.prior
        cache = prior.cache_dir or Path(trainer.default_root_dir) / "class_images"
        if trainer.is_global_zero:  # one rank draws and writes; the others read its file
            class_images(self, labels, prior.num_images, cache, prior.seed)
        trainer.strategy.barrier("dreambooth-class-images")
        images, wanted, key = class_images(self, labels, prior.num_images, cache, prior.seed)
        self._prior_images, self._prior_labels, self._prior_key = images, wanted, key

    def _class_batch(self, n: int) -> dict:
        """``n`` class images, drawn by (prior seed, step, rank): a resumed run draws the ones the killed one would."""
        generator = torch.Generator().manual_seed(
            self.prior.seed * 2**40 + self.global_step * 2**10 + self.global_rank
        )
        pick = torch.randint(0, len(self._prior_images), (n,), generator=generator)
        images = self._prior_images[pick].float().div(127.5).sub(1.0)
        return {"image": images.to(self.device), "label": self._prior_labels[pick]}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        n = len(batch["image"])
        inputs = {"image": batch["image"], "label": torch.as_tensor(batch["label"]).cpu()}
        if self.prior is not None:
            if self._prior_images is None:
                raise RuntimeError("the class images are drawn at fit start: train DreamBooth with a Trainer")
            extra = self._class_batch(n)
            inputs = {key: torch.cat([inputs[key], extra[key].to(inputs[key].device)]) for key in inputs}
        losses = self.per_sample_losses(inputs, training=True)
        loss = instance = losses[:n].mean()
        self.log("train/instance_loss", instance, sync_dist=True, batch_size=n)
        if self.prior is not None:
            prior = losses[n:].mean()
            loss = instance + self.prior.weight * prior
            self.log("train/prior_loss", prior, sync_dist=True, batch_size=n)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, batch_size=n)
        return loss

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self._prior_images is not None:
            checkpoint["dreambooth_class_images"] = {
                "images": self._prior_images,
                "labels": self._prior_labels,
                "key": self._prior_key,
            }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        stored = checkpoint.get("dreambooth_class_images")
        if stored is not None:
            self._prior_images, self._prior_labels = stored["images"], stored["labels"]
            self._prior_key = stored["key"]


def class_tables(module: nn.Module, num_classes: int) -> list[str]:
    """Names of the class-embedding tables of a class-conditional ``LatentDiffusion``: the conditioner's token
    table and the denoiser's (UNet ``class_embedding``, DiT's per-block label tables), each ``num_classes``
    classes + the null class."""
    names = ["conditioner.embedding"]
    for name, layer in module.model.named_modules():
        plain = isinstance(layer, nn.Embedding) and not isinstance(layer, ExtendedEmbedding)
        if (
            plain
            and layer.num_embeddings == num_classes + 1
            and name.endswith(("class_embedding", "embedding_table"))
        ):
            names.append(f"model.{name}")
    if len(names) == 1:
        raise ValueError("the denoiser has no class-embedding table to add the identifier to")
    return names
