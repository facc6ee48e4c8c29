"""``LatentDiffusion``: stage 2 of LDM, a denoiser trained on a frozen autoencoder's latents.

Conditioning (class, caption or none) with classifier-free condition dropout, optional spatial
conditioning by concatenation (inpainting: a mask and the masked image's latents), the training
options of diffusers' scripts (beta schedule, zero-terminal SNR, epsilon/v prediction, min-SNR-gamma,
noise offset, gradient checkpointing) and sampling with DDPM / DDIM / DPM-Solver++, guidance, negative
prompts, img2img and inpainting through the one loop in ``zoo.diffusion.sampling``. EMA is the
``zoo.callbacks.EMA`` callback; mixed precision is the trainer's ``precision``.

``autoencoder`` is a stage-1 checkpoint, a diffusers directory, an architecture dict (an *untrained*
autoencoder: what the shipped configs use so that they run anywhere; pass a checkpoint for real
training) or ``None`` (pixel space). The first stage is frozen and held in eval mode whatever the
trainer does. The scale factor is estimated at the start of fitting unless given (``zoo.diffusion.scale``)
and stored as a buffer, so it is part of every checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn

from zoo.base import ZooModule
from zoo.diffusion.conditioning import Conditioning, build_conditioner
from zoo.diffusion.denoiser import Denoiser, sharding_block_types
from zoo.diffusion.first_stage import IdentityFirstStage, load_first_stage
from zoo.diffusion.sampling import guided, sample
from zoo.diffusion.scale import latent_scale_factor
from zoo.diffusion.schedules import build_noise_scheduler, build_sampler, loss_weights
from zoo.optim import WarmupCosineLR

__all__ = ["LatentDiffusion", "random_box_masks"]


def random_box_masks(
    batch_size: int, size: int, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """(B, 1, size, size) masks, 1 inside one random rectangle of 1/4 to 3/4 of each side (the region to fill)."""
    masks = torch.zeros(batch_size, 1, size, size)
    low, high = max(size // 4, 1), max(3 * size // 4, 2)
    for i in range(batch_size):
        h, w = (int(v) for v in torch.randint(low, high, (2,), generator=generator))
        top = int(torch.randint(0, size - h + 1, (1,), generator=generator))
        left = int(torch.randint(0, size - w + 1, (1,), generator=generator))
        masks[i, :, top : top + h, left : left + w] = 1.0
    return masks.to(device)


class LatentDiffusion(ZooModule):
    """Latent diffusion with a UNet or DiT denoiser; see the module docstring for the pieces.

    Args:
        autoencoder: stage-1 ``.ckpt`` path, diffusers directory, ``build_autoencoder`` dict, or ``None``.
        scale_factor: latent scale; ``None`` estimates ``1/std`` over ``scale_estimation_batches`` batches
            per rank at the start of fitting (1 in pixel space).
        img_size / in_channels: the images (linked from the data module).
        denoiser: ``"unet"`` (``UNet2DConditionModel``) or ``"dit"`` (``DiTTransformer2DModel``).
        denoiser_config: diffusers constructor arguments overriding the small defaults.
        conditioning: ``"class"``, ``"caption"`` or ``"none"``.
        num_classes / caption_vocabulary: linked from the data module.
        context_dim / text_layers / text_heads / max_caption_length: the caption encoder (and class token).
        text_encoder_path: a local ``CLIPTextModel`` directory instead of the jointly trained encoder.
        condition_dropout: probability of training a sample on the null condition (for guidance).
        inpainting: concatenate a mask and the masked image's latents to the input (random boxes in training).
        beta_schedule: ``"linear"``, ``"scaled_linear"`` or ``"cosine"``; num_train_timesteps, beta_start/end.
        rescale_zero_terminal_snr / prediction_type / snr_gamma / noise_offset: diffusers' training options.
        gradient_checkpointing: recompute the denoiser's activations in backward.
        cache_latents: encode each training image once and keep its latent (CPU memory, keyed by the
            batch's ``index``): the frozen encoder then costs nothing after the first epoch. Only for
            data without random augmentation (refused with ``random_flip``).
        base_checkpoint: a ``LatentDiffusion`` checkpoint to start from (LoRA and ControlNet fine-tuning).
        lora_rank / lora_alpha / lora_targets: train only LoRA adapters (peft) on the denoiser's attention.
        sampler / sampling_steps / guidance_scale / eta / negative_prompt / samples_per_prompt / seed:
            defaults of ``generate`` and of ``predict_step``.
    """

    replicated_modules = ("first_stage",)  # frozen, and encode/decode run outside forward

    def __init__(
        self,
        autoencoder: str | dict | None = None,
        scale_factor: float | None = None,
        scale_estimation_batches: int = 8,
        img_size: int = 32,
        in_channels: int = 3,
        denoiser: str = "unet",
        denoiser_config: dict | None = None,
        conditioning: str = "class",
        num_classes: int = 0,
        caption_vocabulary: list[str] | None = None,
        context_dim: int = 128,
        text_layers: int = 2,
        text_heads: int = 4,
        max_caption_length: int = 16,
        text_encoder_path: str | None = None,
        condition_dropout: float = 0.1,
        inpainting: bool = False,
        beta_schedule: str = "linear",
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        rescale_zero_terminal_snr: bool = False,
        prediction_type: str = "epsilon",
        snr_gamma: float | None = None,
        noise_offset: float = 0.0,
        gradient_checkpointing: bool = False,
        cache_latents: bool = False,
        base_checkpoint: str | None = None,
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        lora_targets: list[str] | None = None,
        sampler: str = "dpmsolver++",
        sampling_steps: int = 25,
        guidance_scale: float = 3.0,
        eta: float = 0.0,
        negative_prompt: str = "",
        samples_per_prompt: int = 4,
        seed: int = 0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if not 0.0 <= condition_dropout < 1.0:
            raise ValueError(f"condition_dropout must be in [0, 1), got {condition_dropout}")
        build_sampler(sampler, build_noise_scheduler())  # fail early on an unknown sampler name
        self.first_stage = load_first_stage(autoencoder, in_channels)
        factor = self.first_stage.downsample_factor
        if img_size % factor:
            raise ValueError(
                f"img_size={img_size} is not divisible by the autoencoder's downsampling factor {factor}"
            )
        self.latent_size = img_size // factor
        self.latent_channels = self.first_stage.latent_channels
        known_scale = 1.0 if isinstance(self.first_stage, IdentityFirstStage) else scale_factor
        self.register_buffer("scale_factor", torch.tensor(float(known_scale or 0.0)))
        self.conditioner = build_conditioner(
            conditioning, context_dim, num_classes, caption_vocabulary, text_layers, text_heads,
            max_caption_length, text_encoder_path,
        )  # fmt: skip
        extra = self.latent_channels + 1 if inpainting else 0
        self.denoiser = Denoiser(
            denoiser,
            sample_size=self.latent_size,
            in_channels=self.latent_channels + extra,
            out_channels=self.latent_channels,
            context_dim=getattr(self.conditioner, "dim", context_dim),
            num_classes=num_classes if conditioning == "class" else 0,
            config=denoiser_config,
        )
        if gradient_checkpointing:
            self.denoiser.model.enable_gradient_checkpointing()
        self.noise_scheduler = build_noise_scheduler(
            beta_schedule,
            num_train_timesteps,
            beta_start,
            beta_end,
            prediction_type,
            rescale_zero_terminal_snr,
        )
        self.sharding_units = sharding_block_types(self.denoiser.model)
        if base_checkpoint is not None:
            self.load_base_checkpoint(base_checkpoint)
        if lora_rank > 0:
            from zoo.diffusion.lora import add_lora

            self.requires_grad_(False)
            add_lora(self.denoiser.model, lora_rank, lora_alpha, lora_targets)
        self.first_stage.requires_grad_(False)
        self._latent_cache: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------- set-up
    def load_base_checkpoint(self, path: str) -> None:
        """Weights (denoiser, conditioner, scale factor, first stage) of a ``LatentDiffusion`` checkpoint."""
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"base_checkpoint {str(file)!r} does not exist")
        state = torch.load(file, map_location="cpu", weights_only=True).get("state_dict")
        if not isinstance(state, dict):
            raise ValueError(f"base_checkpoint {str(file)!r} has no state_dict: not a Lightning checkpoint")
        own = self.state_dict()
        wanted = {k: v for k, v in state.items() if k in own and not k.startswith(("controlnet.",))}
        missing = [k for k in own if k not in wanted and not k.startswith("controlnet.") and "lora_" not in k]
        if missing:
            raise ValueError(
                f"base_checkpoint {str(file)!r} lacks {len(missing)} weights of this model, e.g. {missing[:3]}"
            )
        self.load_state_dict(wanted, strict=False)

    def train(self, mode: bool = True) -> LatentDiffusion:
        super().train(mode)
        self.first_stage.eval()  # frozen, whatever the trainer does
        return self

    def on_fit_start(self) -> None:
        super().on_fit_start()
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.hparams.cache_latents and getattr(getattr(datamodule, "hparams", None), "random_flip", False):
            raise ValueError("cache_latents needs unaugmented data: the data module has random_flip=True")
        bucketed = getattr(getattr(datamodule, "hparams", None), "resolution_buckets", False)
        if bucketed and self.hparams.denoiser == "dit":
            raise ValueError(
                "resolution_buckets serve non-square images, which diffusers' DiTTransformer2DModel cannot "
                "unpatchify (it assumes square latents): use denoiser='unet' or turn the buckets off"
            )
        if float(self.scale_factor) == 0.0:
            self.estimate_scale_factor()
        if isinstance(self.hparams.autoencoder, dict):
            rank_zero_warn(
                "LatentDiffusion is using an untrained autoencoder built from a config dict: fine for a smoke "
                "run, but pass a stage-1 checkpoint (model.init_args.autoencoder=path.ckpt) for real training"
            )

    def estimate_scale_factor(self) -> float:
        """``1/std`` of the latents over ``scale_estimation_batches`` batches per rank, all-reduced."""
        trainer = self.trainer
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None:
            raise RuntimeError(
                "estimating scale_factor needs a data module; or set model.init_args.scale_factor"
            )
        strategy = trainer.strategy
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(0)
            value = latent_scale_factor(
                lambda b: self.first_stage.encode(b["image"].to(self.device)),
                datamodule.train_dataloader(),
                1 if trainer.fast_dev_run else self.hparams.scale_estimation_batches,
                rank=trainer.global_rank,
                world_size=trainer.world_size,
                all_reduce_sum=(lambda t: strategy.reduce(t.to(self.device), reduce_op="sum").cpu())
                if trainer.world_size > 1
                else None,
            )
        self.scale_factor.fill_(value)
        if self.logger is not None and trainer.is_global_zero:
            self.logger.log_metrics({"scale_factor": value}, step=trainer.global_step)
        return value

    def _require_scale(self) -> float:
        value = float(self.scale_factor)
        if value == 0.0:
            raise RuntimeError(
                "scale_factor was never estimated: fit the model (it is estimated at fit start), load a "
                "checkpoint, or pass model.init_args.scale_factor"
            )
        return value

    # -------------------------------------------------------------- latents
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.first_stage.encode(images) * self._require_scale()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.first_stage.decode(latents / self._require_scale()).clamp(-1, 1)

    def _concat_inputs(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Inpainting channels: the mask at latent size and the latents of the image with the hole blanked."""
        masked = images * (1 - masks)
        small = F.interpolate(masks, size=(self.latent_size, self.latent_size), mode="nearest")
        return torch.cat([small, self.encode(masked)], dim=1)

    # ----------------------------------------------------------- conditions
    def condition(
        self, batch: dict, dropout: float = 0.0, generator: torch.Generator | None = None
    ) -> Conditioning:
        n = len(batch["caption"]) if "caption" in batch else len(batch["label"])
        drop = None
        if dropout > 0:
            drop = (torch.rand(n, generator=generator) < dropout).to(self.device)
        if "label" in batch and torch.is_tensor(batch["label"]):
            batch = {**batch, "label": batch["label"].to(self.device)}
        return self.conditioner.from_batch(batch, drop)

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Conditioning,
        concat: torch.Tensor | None = None,
        control: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The denoiser's prediction (noise or v); ``concat`` is the inpainting input, ``control`` a
        ControlNet's conditioning image (only ``ControlNetDiffusion`` takes one)."""
        if control is not None:
            raise ValueError("control images need a ControlNetDiffusion model")
        if concat is not None:
            noisy_latents = torch.cat([noisy_latents, concat], dim=1)
        return self.denoiser(noisy_latents, timesteps, cond)

    def control_image(self, batch: dict) -> torch.Tensor | None:
        """The spatial control derived from a batch (``None`` here; ControlNet returns its edge map)."""
        return None

    # ------------------------------------------------------------- training
    def _training_latents(self, batch: dict) -> torch.Tensor:
        """Scaled latents of a training batch, from the cache where possible."""
        if not (self.hparams.cache_latents and "index" in batch):
            return self.encode(batch["image"])
        keys = batch["index"].tolist()
        missing = [i for i, k in enumerate(keys) if k not in self._latent_cache]
        if missing:
            fresh = self.first_stage.encode(batch["image"][missing]).detach().cpu()
            self._latent_cache.update({keys[i]: z for i, z in zip(missing, fresh)})
        unscaled = torch.stack([self._latent_cache[k] for k in keys]).to(self.device)
        return unscaled * self._require_scale()

    def draw_noise(
        self, batch: dict, latents: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The noise (with the optional offset) and the timesteps a loss evaluation uses, one per latent."""
        b = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        if self.hparams.noise_offset:
            offset = torch.randn((b, latents.shape[1], 1, 1), generator=generator).to(latents)
            noise = noise + self.hparams.noise_offset * offset
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (b,), generator=generator).to(latents.device)
        return noise, timesteps

    def diffusion_loss(
        self,
        batch: dict,
        generator: torch.Generator | None = None,
        dropout: float = 0.0,
        training: bool = False,
    ) -> torch.Tensor:
        images = batch["image"]
        latents = self._training_latents(batch) if training else self.encode(images)
        b = latents.shape[0]
        concat = None
        if self.hparams.inpainting:
            masks = random_box_masks(b, images.shape[-1], generator, images.device)
            concat = self._concat_inputs(images, masks)
        cond = self.condition(batch, dropout, generator)
        noise, timesteps = self.draw_noise(batch, latents, generator)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.hparams.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        prediction = self(noisy, timesteps, cond, concat, self.control_image(batch))
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        weights = loss_weights(
            self.noise_scheduler, timesteps, self.hparams.snr_gamma, self.hparams.prediction_type
        )
        return (per_sample * weights).mean()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.diffusion_loss(batch, dropout=self.hparams.condition_dropout, training=True)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["image"]))
        return loss

    def _evaluate(self, batch: dict, batch_idx: int, stage: str) -> torch.Tensor:
        # Fixed noise and timesteps per batch: the validation loss is comparable between epochs.
        generator = torch.Generator().manual_seed(10_000 + batch_idx)
        loss = self.diffusion_loss(batch, generator=generator)
        self.log(
            f"{stage}/loss", loss, prog_bar=stage == "val", sync_dist=True, batch_size=len(batch["image"])
        )
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, batch_idx, "test")

    def parameter_groups(self) -> list[dict]:
        groups = super().parameter_groups()
        if not groups:
            raise ValueError("LatentDiffusion has no trainable parameters")
        return groups

    # ------------------------------------------------------------- sampling
    def _model_fn(self, concat: torch.Tensor | None, control: torch.Tensor | None):
        def fn(x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
            def tile(extra):  # guidance doubles the batch
                return None if extra is None else extra.repeat(x.shape[0] // extra.shape[0], 1, 1, 1)

            return self(x, t, cond, tile(concat), tile(control))

        return fn

    def _conditions(self, labels, captions, negative_captions, n: int) -> tuple[Conditioning, Conditioning]:
        kind = self.hparams.conditioning
        if kind == "class":
            if labels is None:
                raise ValueError("a class-conditional model needs labels to sample")
            cond = self.conditioner(torch.as_tensor(labels, device=self.device))
            return cond, self.conditioner.null(n, self.device)
        if kind == "caption":
            if captions is None:
                raise ValueError("a caption-conditional model needs captions to sample")
            negative = negative_captions or [self.hparams.negative_prompt] * n
            if len(negative) != n:
                raise ValueError(f"got {len(negative)} negative prompts for {n} captions")
            return self.conditioner(list(captions)), self.conditioner(list(negative))
        null = self.conditioner.null(n, self.device)
        return null, null

    @torch.no_grad()
    def generate(
        self,
        labels: list[int] | torch.Tensor | None = None,
        captions: list[str] | None = None,
        negative_captions: list[str] | None = None,
        num_samples: int | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        eta: float | None = None,
        init_images: torch.Tensor | None = None,
        strength: float = 0.8,
        masks: torch.Tensor | None = None,
        control_images: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Images in [-1, 1], one per label / caption (or ``num_samples`` unconditional ones).

        ``init_images`` with ``strength`` < 1 is img2img; ``init_images`` with ``masks`` (1 = fill) is
        inpainting; ``control_images`` drive a ControlNet. The same arguments and seed give the same images.
        """
        hp = self.hparams
        n = len(labels) if labels is not None else len(captions) if captions is not None else num_samples
        if not n:
            raise ValueError("give labels, captions or num_samples")
        cond, uncond = self._conditions(labels, captions, negative_captions, n)
        scheduler = build_sampler(sampler or hp.sampler, self.noise_scheduler)
        generator = torch.Generator().manual_seed(hp.seed if seed is None else seed)
        shape = (n, self.latent_channels, self.latent_size, self.latent_size)
        concat = init_latents = mask_small = known = None
        if init_images is not None:
            init_images = init_images.to(self.device)
            init_latents = self.encode(init_images)
        if masks is not None:
            if init_images is None:
                raise ValueError("inpainting needs init_images as well as masks")
            masks = masks.to(self.device)
            mask_small = F.interpolate(masks, size=shape[-2:], mode="nearest")
            known = init_latents
            if hp.inpainting:
                concat = self._concat_inputs(init_images, masks)
        if hp.inpainting and concat is None:  # no mask given: the whole image is the hole
            side = hp.img_size
            blank = torch.zeros(n, hp.in_channels, side, side, device=self.device)
            concat = self._concat_inputs(blank, torch.ones(n, 1, side, side, device=self.device))
        if control_images is not None:
            control_images = control_images.to(self.device)
        model_fn = guided(
            self._model_fn(concat, control_images),
            cond,
            uncond,
            hp.guidance_scale if guidance_scale is None else guidance_scale,
        )
        latents = sample(
            model_fn,
            scheduler,
            shape,
            num_inference_steps=steps or hp.sampling_steps,
            generator=generator,
            eta=hp.eta if eta is None else eta,
            device=self.device,
            init_latents=init_latents if masks is None else None,
            strength=strength if masks is None else 1.0,
            mask=mask_small,
            known_latents=known,
        )
        return self.decode(latents)

    def samples_for_batch(self, batch: dict, n: int) -> torch.Tensor:
        """``n`` samples conditioned like the first ``n`` items of a data batch (for logging)."""
        items = {k: v[:n] for k, v in batch.items()}
        kind = self.hparams.conditioning
        return self.generate(
            labels=items["label"].tolist() if kind == "class" else None,
            captions=list(items["caption"]) if kind == "caption" else None,
            num_samples=len(items["image"]),
            control_images=self.control_image(items),
        )

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """``samples_per_prompt`` images per prompt of the predict loader: ``{"images": (P, N, C, H, W), ...}``."""
        n = self.hparams.samples_per_prompt
        labels = batch["label"].repeat_interleave(n).tolist() if "label" in batch else None
        captions = [c for c in batch["caption"] for _ in range(n)] if "caption" in batch else None
        kind = self.hparams.conditioning
        if kind == "class" and labels is not None and min(labels) < 0:
            raise ValueError(
                f"prompts {batch.get('name')} are not class names of this class-conditional model"
            )
        images = self.generate(
            labels=labels if kind == "class" else None,
            captions=captions if kind == "caption" else None,
            num_samples=len(labels or captions),
            seed=self.hparams.seed + batch_idx,
        )
        return {
            "images": images.view(-1, n, *images.shape[1:]),
            "name": batch.get("name", batch.get("caption")),
            "index": batch.get("index"),
        }

    # ----------------------------------------------------------------- LoRA
    def save_lora(self, path: str | Path) -> Path:
        from zoo.diffusion.lora import save_lora_weights

        return save_lora_weights(self.denoiser.model, path)

    def load_lora(self, path: str | Path) -> None:
        from zoo.diffusion.lora import load_lora_weights

        load_lora_weights(self.denoiser.model, path)

    def on_train_end(self) -> None:
        if self.hparams.lora_rank > 0 and self.trainer.is_global_zero and self.trainer.log_dir:
            path = self.save_lora(Path(self.trainer.log_dir) / "lora.safetensors")
            print(f"zoo: LoRA weights written to {path}", flush=True)
