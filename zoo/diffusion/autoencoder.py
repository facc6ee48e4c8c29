"""``Autoencoder``: LDM's first stage (KL or VQ) trained with its full loss, as a Lightning 2 module.

CompVis trained it with PL 1.x's multi-optimizer ``training_step(..., optimizer_idx)``, which Lightning 2
removed; here the two optimizers (autoencoder, discriminator) step in one manual-optimization
``training_step``. The generator loss is LDM's ``LPIPSWithDiscriminator`` / ``VQLPIPSWithDiscriminator``:

    nll  = (|x - x_hat|_1 + w_p * LPIPS) / exp(logvar) + logvar     (summed over pixels, mean over batch)
    loss = nll + kl_weight * KL            (KL)   or   nll + codebook_weight * (codebook + commitment)  (VQ)
         + d_weight * disc_factor * (-D(x_hat))                   once ``disc_start`` generator steps passed

with ``d_weight`` the adaptive ratio of gradient norms at the decoder's last layer, times ``disc_weight``.
The discriminator takes a hinge loss, optionally plus an R1 gradient penalty, or is spectrally normalised.
``disc_start`` counts generator steps in a checkpointed buffer, because ``trainer.global_step`` counts the
steps of both optimizers under manual optimization.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MetricCollection
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from zoo.base import ZooModule
from zoo.diffusion.first_stage import FirstStage, build_autoencoder
from zoo.diffusion.images import log_image_grid, make_grid, to_unit_range
from zoo.diffusion.losses import (
    PatchDiscriminator,
    adaptive_generator_weight,
    gradient_penalty,
    hinge_discriminator_loss,
    hinge_generator_loss,
)

__all__ = ["ARCHITECTURE_ARGS", "Autoencoder"]

#: The ``Autoencoder`` arguments that define the network (what stage 2 reads back from a checkpoint).
ARCHITECTURE_ARGS = (
    "kind",
    "downsample_factor",
    "latent_channels",
    "base_channels",
    "channel_multipliers",
    "layers_per_block",
    "num_vq_embeddings",
    "mid_attention",
    "norm_num_groups",
)


class Autoencoder(ZooModule):
    """KL- or VQ-regularised autoencoder with L1 (+ LPIPS) reconstruction and a PatchGAN.

    Args:
        kind: ``"kl"`` (diffusers ``AutoencoderKL``) or ``"vq"`` (``VQModel``).
        downsample_factor: 1, 2, 4, 8 or 16; the latent is ``image_size / f`` on a side.
        latent_channels: channels of the latent (LDM: 3 for VQ-f4, 4 for KL-f8...).
        base_channels / channel_multipliers / layers_per_block / mid_attention / norm_num_groups: the
            encoder/decoder width and depth (see ``build_autoencoder``).
        num_vq_embeddings: codebook size (VQ only).
        kl_weight: LDM's 1e-6: barely regularised, so latents stay informative.
        codebook_weight: weight of the VQ codebook + commitment loss.
        perceptual_weight: LPIPS weight (LDM uses 1.0); > 0 needs ``perceptual_weights_path``.
        learn_logvar: LDM's learned scalar log-variance on the reconstruction NLL.
        disc_start: generator steps before the discriminator (and its loss) switch on.
        disc_weight: scale of the adaptive generator weight (LDM 0.5); 0 disables the GAN.
        disc_regularizer: ``"none"``, ``"gradient_penalty"`` (R1, weight ``gp_weight``) or ``"spectral_norm"``.
        optimizer / disc_optimizer: optimizer callables (the configs use LDM's Adam with betas (0.5, 0.9));
            ``disc_optimizer`` defaults to ``optimizer``.
        lr_scheduler: optional, stepped with the autoencoder's optimizer.
        channels_last: NHWC convolutions: about 2-3x faster on CPU for these small-channel networks.
    """

    def __init__(
        self,
        kind: str = "kl",
        downsample_factor: int = 4,
        latent_channels: int = 4,
        base_channels: int = 64,
        channel_multipliers: list[int] | None = None,
        layers_per_block: int = 1,
        num_vq_embeddings: int = 512,
        mid_attention: bool = True,
        norm_num_groups: int = 32,
        img_size: int = 32,
        kl_weight: float = 1e-6,
        codebook_weight: float = 1.0,
        perceptual_weight: float = 0.0,
        perceptual_weights_path: str | None = None,
        learn_logvar: bool = True,
        disc_start: int = 2000,
        disc_weight: float = 0.5,
        disc_factor: float = 1.0,
        disc_layers: int = 3,
        disc_channels: int = 64,
        disc_regularizer: str = "none",
        gp_weight: float = 10.0,
        num_logged_images: int = 8,
        channels_last: bool = True,
        optimizer: OptimizerCallable = torch.optim.Adam,
        disc_optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler)
        self.save_hyperparameters(ignore=["optimizer", "disc_optimizer", "lr_scheduler"])
        if disc_regularizer not in ("none", "gradient_penalty", "spectral_norm"):
            raise ValueError(
                f"disc_regularizer must be 'none', 'gradient_penalty' or 'spectral_norm', got {disc_regularizer!r}"
            )
        self.automatic_optimization = False
        self.disc_optimizer_factory = disc_optimizer
        architecture = {k: v for k, v in self.hparams.items() if k in ARCHITECTURE_ARGS}
        self.first_stage = FirstStage(build_autoencoder(**architecture, image_size=img_size))
        self.perceptual = None
        if perceptual_weight > 0:
            from zoo.diffusion.perceptual import PerceptualLoss

            self.perceptual = PerceptualLoss(perceptual_weights_path)
        self.logvar = torch.nn.Parameter(torch.zeros(()), requires_grad=learn_logvar)
        self.discriminator = PatchDiscriminator(
            channels=disc_channels, num_layers=disc_layers, spectral_norm=disc_regularizer == "spectral_norm"
        )
        self.register_buffer("generator_steps", torch.zeros((), dtype=torch.long))
        if channels_last:
            self.first_stage.to(memory_format=torch.channels_last)
            self.discriminator.to(memory_format=torch.channels_last)
        self.sharding_units = ()
        self.setup_metrics()

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
        return self.first_stage.decode(self.first_stage.encode(images))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.first_stage.encode(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.first_stage.decode(latents)

    def _reconstruct(self, images: torch.Tensor, sample: bool):
        latents, kl = self.first_stage.encode_with_regulariser(images, sample=sample)
        recon, codebook = self.first_stage.decode_with_regulariser(latents)
        return recon, latents, kl, codebook

    # ------------------------------------------------------------------- loss
    def reconstruction_nll(
        self, images: torch.Tensor, recon: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(nll, l1)``: LDM's NLL (sum over pixels, mean over batch) and the plain per-pixel L1 for logging."""
        rec = (images - recon).abs()
        if self.perceptual is not None:
            rec = rec + self.hparams.perceptual_weight * self.perceptual(images, recon).view(-1, 1, 1, 1)
        nll = rec / torch.exp(self.logvar) + self.logvar
        return nll.sum() / images.shape[0], rec.mean()

    def discriminator_active(self) -> bool:
        return self.hparams.disc_weight > 0 and int(self.generator_steps) >= self.hparams.disc_start

    def generator_loss(
        self, images: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        recon, _, kl, codebook = self._reconstruct(images, sample=True)
        nll, l1 = self.reconstruction_nll(images, recon)
        logs = {"rec_loss": l1.detach(), "nll": nll.detach(), "logvar": self.logvar.detach()}
        loss = nll
        if kl is not None:
            kl = kl.mean()
            loss = loss + self.hparams.kl_weight * kl
            logs["kl"] = kl.detach()
        if codebook is not None:
            loss = loss + self.hparams.codebook_weight * codebook
            logs["codebook"] = codebook.detach()
        if self.discriminator_active():
            self.discriminator.eval()  # generator pass: no BatchNorm statistics from fakes alone
            g_loss = hinge_generator_loss(self.discriminator(recon))
            self.discriminator.train()
            d_weight = adaptive_generator_weight(nll, g_loss, self.first_stage.last_layer())
            d_weight = d_weight * self.hparams.disc_weight
            loss = loss + d_weight * self.hparams.disc_factor * g_loss
            logs.update(g_loss=g_loss.detach(), d_weight=d_weight)
        return loss, logs, recon.detach()

    def discriminator_loss(self, images: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, dict]:
        penalty = self.hparams.disc_regularizer == "gradient_penalty"
        real = images.detach().requires_grad_(penalty)
        logits_real = self.discriminator(real)
        logits_fake = self.discriminator(recon.detach())
        loss = self.hparams.disc_factor * hinge_discriminator_loss(logits_real, logits_fake)
        logs = {
            "d_loss": loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
        if penalty:
            gp = gradient_penalty(logits_real, real)
            loss = loss + self.hparams.gp_weight * gp
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
        latents = self.first_stage.encode(images)
        recon = self.first_stage.decode(latents)
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

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        return {"reconstruction": self(batch["image"])}

    # -------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> Any:
        ae_params = [p for p in self.first_stage.parameters() if p.requires_grad]
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
