"""``Autoencoder``: LDM's first stage (KL or VQ) trained with its full loss, as a Lightning 2 module.

CompVis trained it with PL 1.x's multi-optimizer ``training_step(..., optimizer_idx)``, which Lightning 2
removed; here the two optimizers (autoencoder, discriminator) step in one manual-optimization
``training_step``. The generator loss is LDM's ``LPIPSWithDiscriminator`` / ``VQLPIPSWithDiscriminator``:

    nll  = (|x - x_hat|_1 + w_p * LPIPS) / exp(logvar) + logvar     (summed over pixels, mean over batch)
    loss = nll + kl_weight * KL            (KL)   or   nll + codebook_weight * (codebook + commitment)  (VQ)
         + d_weight * factor * (-D(x_hat))               once ``discriminator.start`` generator steps passed

with ``d_weight`` the adaptive ratio of gradient norms at the decoder's last layer, times
``discriminator.weight``. The weights are the ``loss`` part (``AutoencoderLoss``), the GAN's the
``discriminator`` part (``DiscriminatorConfig``). The discriminator takes a hinge loss, optionally plus an R1
gradient penalty, or is spectrally normalised. Its start counts generator steps in a checkpointed buffer,
because ``trainer.global_step`` counts the steps of both optimizers under manual optimization. Validation
logs PSNR and SSIM (``val/psnr``, ``val/ssim``) through the base's metrics, the L1 and latent statistics.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from zoo.base import ZooModule
from zoo.diffusion.checkpoints import upgrade_autoencoder_arguments
from zoo.diffusion.images import log_image_grid, make_grid, to_pil, to_unit_range
from zoo.diffusion.losses import (
    AutoencoderLoss,
    DiscriminatorConfig,
    adaptive_generator_weight,
    gradient_penalty,
    hinge_discriminator_loss,
    hinge_generator_loss,
)
from zoo.diffusion.model import AUTOENCODERS, FirstStage, build_autoencoder
from zoo.parts import plain_part, resolve_part

__all__ = ["Autoencoder"]


class _FirstStageCall(nn.Module):
    """One direction of the first stage, ``encode`` or ``decode``, as a module of its own (one graph)."""

    def __init__(self, first_stage: FirstStage, direction: str) -> None:
        from zoo.diffusion.module import first_stage_networks, read_networks

        super().__init__()
        self.call = getattr(first_stage, direction)  # a bound method: the graph holds only what it reads
        self.networks = read_networks(**first_stage_networks(first_stage, direction))

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.call(tensor)


class Autoencoder(ZooModule):
    """KL- or VQ-regularised autoencoder with L1 (+ LPIPS) reconstruction and a PatchGAN.

    Args:
        model_name: ``"kl"`` (diffusers ``AutoencoderKL``) or ``"vq"`` (``VQModel``).
        model_kwargs: the architecture, ``build_autoencoder``'s arguments: ``downsample_factor`` (1-16; the
            latent is ``img_size / f`` on a side), ``latent_channels`` (LDM: 3 for VQ-f4, 4 for KL-f8...),
            ``base_channels`` / ``channel_multipliers`` / ``layers_per_block`` / ``mid_attention`` /
            ``norm_num_groups`` (width and depth), ``num_vq_embeddings`` (codebook size, VQ only).
        img_size: side of the images (linked from the data module).
        loss: reconstruction and regularisation weights (``AutoencoderLoss``).
        discriminator: the PatchGAN and when it starts (``DiscriminatorConfig``).
        num_logged_images: originals and reconstructions shown on image loggers after validation.
        channels_last: NHWC convolutions: about 2-3x faster on CPU for these small-channel networks.
        compile: ``torch.compile`` the encoder and decoder when a trainer sets the module up: ``true``, or a
            dict of ``torch.compile`` options (``mode``, ``fullgraph``, ``dynamic``, ``backend``, ``options``);
            checkpoints are the same as without it (``ZooModule.compile_network``).
        optimizer / disc_optimizer: optimizer callables (the configs use LDM's Adam with betas (0.5, 0.9));
            ``disc_optimizer`` defaults to ``optimizer``.
        lr_scheduler: optional, stepped with the autoencoder's optimizer.
    """

    hparams_ignore = ("disc_optimizer",)
    state_dict_renames = (("first_stage.", "model."),)

    @classmethod
    def upgrade_hyperparameters(cls, hparams: dict) -> dict:
        """The flat arguments of earlier versions, grouped into today's parts."""
        return super().upgrade_hyperparameters(upgrade_autoencoder_arguments(hparams))

    def __init__(
        self,
        model_name: str = "kl",
        model_kwargs: dict | None = None,
        img_size: int = 32,
        # parts are frozen dataclasses: their instances are safe (immutable) defaults
        loss: AutoencoderLoss = AutoencoderLoss(),
        discriminator: DiscriminatorConfig = DiscriminatorConfig(),
        num_logged_images: int = 8,
        channels_last: bool = True,
        compile: bool | dict = False,
        optimizer: OptimizerCallable = torch.optim.Adam,
        disc_optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        if model_name not in AUTOENCODERS:
            raise ValueError(f"model_name must be one of {sorted(AUTOENCODERS)}, got {model_name!r}")
        # checked, and saved as plain data: checkpoints and hparams.yaml then hold no classes
        loss = plain_part(loss, AutoencoderLoss)
        discriminator = plain_part(discriminator, DiscriminatorConfig)
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler)
        self.disc_optimizer_factory = disc_optimizer
        self.automatic_optimization = False

    def configure_models(self) -> None:
        hp = self.hparams
        self.model = FirstStage(
            build_autoencoder(hp.model_name, **(hp.model_kwargs or {}), img_size=hp.img_size)
        )
        if hp.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.register_buffer("generator_steps", torch.zeros((), dtype=torch.long))

    def compiled_networks(self) -> list[torch.nn.Module]:
        """The encoder and decoder: training calls them through ``encode``/``decode``, never ``forward``."""
        return [self.model.autoencoder.encoder, self.model.autoencoder.decoder]

    def configure_losses(self) -> None:
        """The loss parts, LPIPS, the log-variance and the PatchGAN."""
        self.loss_config = resolve_part(self.hparams.loss, AutoencoderLoss)
        self.disc_config = resolve_part(self.hparams.discriminator, DiscriminatorConfig)
        self.perceptual = None
        if self.loss_config.perceptual_weight > 0:
            from zoo.diffusion.perceptual import PerceptualLoss

            self.perceptual = PerceptualLoss(self.loss_config.perceptual_weights_path)
        self.logvar = torch.nn.Parameter(torch.zeros(()), requires_grad=self.loss_config.learn_logvar)
        self.discriminator = self.disc_config.build()
        if self.hparams.channels_last:
            self.discriminator.to(memory_format=torch.channels_last)

    def configure_metrics(self) -> MetricCollection:
        return MetricCollection(
            {
                "psnr": PeakSignalNoiseRatio(data_range=1.0),
                "ssim": StructuralSimilarityIndexMeasure(data_range=1.0),
            }
        )

    # ------------------------------------------------------------------ model
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction of images in [-1, 1] (deterministic: KL posterior mode)."""
        return self.model(images)

    def example_inputs(self, batch_size: int = 2) -> tuple[torch.Tensor]:
        side = self.hparams.img_size
        images = torch.rand(batch_size, self.model.image_channels, side, side, device=self.device) * 2 - 1
        return (images,)

    def export_graphs(self) -> list:
        """What ``zoo export --format pt2|onnx`` writes, both with a dynamic batch: ``encoder`` (images in
        [-1, 1] -> latents: the KL posterior's mode, or VQ's latents before quantisation, as ``encode``) and
        ``decoder`` (latents -> images, unclamped; VQ quantises first, as ``decode``). The latents are
        unscaled: a latent-diffusion model's own ``decoder`` graph applies its scale factor. diffusers'
        upsampling layers are made export-friendly in place (``exportable_upsampling``)."""
        from zoo.diffusion.module import batch_graph, exportable_upsampling

        exportable_upsampling(self.model)
        factor = self.model.downsample_factor
        side = self.hparams.img_size // factor

        def images(n: int) -> dict[str, torch.Tensor]:
            return {"images": self.example_inputs(n)[0]}

        def latents(n: int) -> dict[str, torch.Tensor]:
            generator = torch.Generator().manual_seed(n)
            shape = (n, self.model.latent_channels, side, side)
            return {"latents": torch.randn(shape, generator=generator).to(self.device)}

        return [
            batch_graph("encoder", _FirstStageCall(self.model, "encode"), images, ("latents",)),
            batch_graph("decoder", _FirstStageCall(self.model, "decode"), latents, ("images",)),
        ]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.model.decode(latents)

    def _reconstruct(self, images: torch.Tensor, sample: bool):
        latents, kl = self.model.encode_with_regulariser(images, sample=sample)
        recon, codebook = self.model.decode_with_regulariser(latents)
        return recon, latents, kl, codebook

    # ------------------------------------------------------------------- loss
    def reconstruction_nll(
        self, images: torch.Tensor, recon: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(nll, l1)``: LDM's NLL (sum over pixels, mean over batch) and the plain per-pixel L1 for logging."""
        rec = (images - recon).abs()
        if self.perceptual is not None:
            rec = rec + self.loss_config.perceptual_weight * self.perceptual(images, recon).view(-1, 1, 1, 1)
        nll = rec / torch.exp(self.logvar) + self.logvar
        return nll.sum() / images.shape[0], rec.mean()

    def discriminator_active(self) -> bool:
        return self.disc_config.weight > 0 and int(self.generator_steps) >= self.disc_config.start

    def generator_loss(
        self, images: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        recon, _, kl, codebook = self._reconstruct(images, sample=True)
        nll, l1 = self.reconstruction_nll(images, recon)
        logs = {"rec_loss": l1.detach(), "nll": nll.detach(), "logvar": self.logvar.detach()}
        loss = nll
        if kl is not None:
            kl = kl.mean()
            loss = loss + self.loss_config.kl_weight * kl
            logs["kl"] = kl.detach()
        if codebook is not None:
            loss = loss + self.loss_config.codebook_weight * codebook
            logs["codebook"] = codebook.detach()
        if self.discriminator_active():
            self.discriminator.eval()  # generator pass: no BatchNorm statistics from fakes alone
            g_loss = hinge_generator_loss(self.discriminator(recon))
            self.discriminator.train()
            d_weight = adaptive_generator_weight(nll, g_loss, self.model.last_layer())
            d_weight = d_weight * self.disc_config.weight
            loss = loss + d_weight * self.disc_config.factor * g_loss
            logs.update(g_loss=g_loss.detach(), d_weight=d_weight)
        return loss, logs, recon.detach()

    def discriminator_loss(self, images: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, dict]:
        penalty = self.disc_config.regularizer == "gradient_penalty"
        real = images.detach().requires_grad_(penalty)
        logits_real = self.discriminator(real)
        logits_fake = self.discriminator(recon.detach())
        loss = self.disc_config.factor * hinge_discriminator_loss(logits_real, logits_fake)
        logs = {
            "d_loss": loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
        if penalty:
            gp = gradient_penalty(logits_real, real)
            loss = loss + self.disc_config.gp_weight * gp
            logs["gradient_penalty"] = gp.detach()
        return loss, logs

    # ------------------------------------------------------------------ steps
    def _images(self, batch: dict) -> torch.Tensor:
        images = batch["image"]
        return images.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else images

    def training_step(self, batch: dict, batch_idx: int) -> None:
        opt_ae, opt_disc = self.optimizers()
        images = self._images(batch)
        disc_active = self.discriminator_active()
        loss, logs, recon = self.generator_loss(images)
        opt_ae.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt_ae.step()
        self.generator_steps += 1
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        if disc_active:
            d_loss, d_logs = self.discriminator_loss(images, recon)
            opt_disc.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            opt_disc.step()
            logs.update(d_logs)
        logs["loss"] = loss.detach()
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, prog_bar=False, sync_dist=True)

    def _evaluate(self, batch: dict, batch_idx: int, stage: str) -> None:
        images = self._images(batch)
        latents = self.model.encode(images)
        recon = self.model.decode(latents)
        _, l1 = self.reconstruction_nll(images, recon)
        self.log(f"{stage}/rec_loss", l1, prog_bar=stage == "val", sync_dist=True)
        self.log(f"{stage}/latent_mean", latents.mean(), sync_dist=True)
        self.log(f"{stage}/latent_std", latents.std(), sync_dist=True)
        self.update_metrics(stage, to_unit_range(recon), to_unit_range(images))
        if batch_idx == 0 and stage == "val" and self.hparams.num_logged_images > 0:
            n = self.hparams.num_logged_images
            pairs = torch.cat([images[:n], recon[:n]])  # originals on the first row, reconstructions below
            log_image_grid(
                self.logger,
                "val/reconstructions",
                make_grid(to_unit_range(pairs), nrow=min(n, len(images))),
                self.global_step,
            )

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """One record per image: ``{"id": the image's id (or its index), "reconstruction": PIL image}``."""
        if "image" not in batch:
            raise ValueError(
                "the Autoencoder reconstructs images: predict with image data (e.g. ImageClassificationDataModule "
                "with predict_path); CaptionedImageDataModule serves prompts for latent diffusion"
            )
        recon = to_unit_range(self(self._images(batch)))
        ids = batch.get("id") or [str(int(i)) for i in batch.get("index", range(len(recon)))]
        return [{"id": str(i), "reconstruction": to_pil(image)} for i, image in zip(ids, recon)]

    # -------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> Any:
        ae_params = [p for p in self.model.parameters() if p.requires_grad]
        if self.logvar.requires_grad:
            ae_params.append(self.logvar)
        opt_ae = self.optimizer_factory(ae_params)
        opt_disc = (self.disc_optimizer_factory or self.optimizer_factory)(
            list(self.discriminator.parameters())
        )
        if self.scheduler_factory is None:
            return [opt_ae, opt_disc]
        scheduler = self.scheduler_factory(opt_ae)
        if getattr(scheduler, "total_steps", 0) is None:
            scheduler.set_total_steps(int(self.trainer.estimated_stepping_batches))
        return [opt_ae, opt_disc], [{"scheduler": scheduler, "interval": "step"}]
