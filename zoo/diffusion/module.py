"""``LatentDiffusion``: stage 2 of LDM, a denoiser trained on a frozen autoencoder's latents.

The module is assembled from parts, each one constructor argument that YAML swaps on its own:

- the first stage, ``autoencoder``: a stage-1 checkpoint, a diffusers directory, an architecture dict
  (an *untrained* autoencoder: what the shipped configs use so that they run anywhere; pass a checkpoint
  for real training) or ``None`` (pixel space). It is frozen and held in eval mode whatever the trainer
  does; the scale factor is estimated at the start of fitting unless given (``zoo.diffusion.scale``) and
  stored as a buffer, so it is part of every checkpoint;
- the denoiser, ``self.model``: diffusers' UNet or DiT (``model_name`` + ``model_kwargs``, ``zoo.diffusion.model``);
- the conditioning: ``ClassConditioning``, ``CaptionConditioning`` or ``NoConditioning``
  (``zoo.diffusion.conditioning``), with classifier-free condition dropout;
- the objective: ``DiffusionObjective`` (beta schedule, zero-terminal SNR, epsilon/v prediction,
  min-SNR-gamma, noise offset; ``zoo.diffusion.schedules``);
- the sampling defaults: ``SamplingConfig`` (DDPM / DDIM / DPM-Solver++, steps, guidance, negative prompt;
  the one loop in ``zoo.diffusion.sampling`` also does img2img and inpainting);
- LoRA: ``LoRAConfig`` or ``None`` (``zoo.lora``).

Optional spatial conditioning by concatenation (inpainting: a mask and the masked image's latents),
gradient checkpointing and a latent cache are flags. EMA is the ``zoo.callbacks.EMA`` callback; mixed
precision is the trainer's ``precision``.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn

from zoo.base import ZooModule, rename_keys
from zoo.diffusion.checkpoints import upgrade_latent_diffusion_arguments
from zoo.diffusion.conditioning import ClassConditioning, Conditioning, ConditioningConfig
from zoo.diffusion.images import make_grid, to_pil, to_unit_range
from zoo.diffusion.model import (
    DENOISERS,
    IdentityFirstStage,
    build_denoiser,
    denoise,
    load_first_stage,
    sharding_block_types,
)
from zoo.diffusion.sampling import SamplingConfig, guided, sample
from zoo.diffusion.scale import latent_scale_factor
from zoo.diffusion.schedules import DiffusionObjective, build_sampler
from zoo.lora import LoRAConfig
from zoo.optim import WarmupCosineLR
from zoo.parts import plain_part, resolve_part

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
    """Latent diffusion with a UNet or DiT denoiser; see the module docstring for the parts.

    Args:
        autoencoder: stage-1 ``.ckpt`` path, diffusers directory, ``{"model_name", "model_kwargs"}`` dict (the
            ``Autoencoder``'s architecture, untrained), or ``None`` for pixel space.
        scale_factor: latent scale; ``None`` estimates ``1/std`` over ``scale_estimation_batches`` batches
            per rank at the start of fitting (1 in pixel space).
        img_size: side of the images (linked from the data module).
        model_name / model_kwargs: the denoiser, ``"unet"`` (``UNet2DConditionModel``) or ``"dit"``
            (``DiTTransformer2DModel``), and diffusers constructor arguments overriding its small defaults.
        conditioning: what the denoiser is conditioned on (``ClassConditioning``, ``CaptionConditioning``,
            ``NoConditioning``), with its condition dropout.
        num_classes / caption_vocabulary: what the data holds (linked from the data module).
        objective: the forward process and the loss (``DiffusionObjective``).
        sampling: defaults of ``generate`` and ``predict_step`` (``SamplingConfig``).
        lora: train only LoRA adapters (peft) on the denoiser (``LoRAConfig``); ``None`` trains everything.
        base_checkpoint: a ``LatentDiffusion`` checkpoint to start from (LoRA and ControlNet fine-tuning).
        inpainting: concatenate a mask and the masked image's latents to the input (random boxes in training).
        gradient_checkpointing: recompute the denoiser's activations in backward.
        cache_latents: encode each training image once and keep its latent (CPU memory, keyed by the
            batch's ``index``): the frozen encoder then costs nothing after the first epoch. Only for
            data without random augmentation (refused with ``random_flip``).
    """

    replicated_modules = ("first_stage",)  # frozen, and encode/decode run outside forward
    state_dict_renames = (("denoiser.model.", "model."),)
    #: The constructor arguments that are parts, and the class each resolves to (``zoo.parts``).
    parts: ClassVar[dict[str, type]] = {
        "conditioning": ConditioningConfig,
        "objective": DiffusionObjective,
        "sampling": SamplingConfig,
        "lora": LoRAConfig,
    }

    @classmethod
    def upgrade_hyperparameters(cls, hparams: dict) -> dict:
        """The flat arguments of earlier versions, grouped into today's parts."""
        return super().upgrade_hyperparameters(upgrade_latent_diffusion_arguments(hparams))

    def __init__(
        self,
        autoencoder: str | dict | None = None,
        scale_factor: float | None = None,
        scale_estimation_batches: int = 8,
        img_size: int = 32,
        model_name: str = "unet",
        model_kwargs: dict | None = None,
        # parts are frozen dataclasses: their instances are safe (immutable) defaults
        conditioning: ConditioningConfig = ClassConditioning(),
        num_classes: int = 0,
        caption_vocabulary: list[str] | None = None,
        objective: DiffusionObjective = DiffusionObjective(),
        sampling: SamplingConfig = SamplingConfig(),
        lora: LoRAConfig | None = None,
        base_checkpoint: str | None = None,
        inpainting: bool = False,
        gradient_checkpointing: bool = False,
        cache_latents: bool = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
    ) -> None:
        if model_name not in DENOISERS:
            raise ValueError(f"model_name must be one of {sorted(DENOISERS)}, got {model_name!r}")
        # checked, and saved as plain data: checkpoints and hparams.yaml then hold no classes
        conditioning = plain_part(conditioning, ConditioningConfig)
        objective = plain_part(objective, DiffusionObjective)
        sampling = plain_part(sampling, SamplingConfig)
        lora = plain_part(lora, LoRAConfig)
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler)

    # ------------------------------------------------------------- set-up
    def configure_models(self) -> None:
        hp = self.hparams
        self.conditioning = resolve_part(hp.conditioning, ConditioningConfig)
        self.objective = resolve_part(hp.objective, DiffusionObjective)
        self.sampling = resolve_part(hp.sampling, SamplingConfig)
        self.lora = resolve_part(hp.lora, LoRAConfig)
        self.first_stage = load_first_stage(hp.autoencoder)
        factor = self.first_stage.downsample_factor
        if hp.img_size % factor:
            raise ValueError(
                f"img_size={hp.img_size} is not divisible by the autoencoder's downsampling factor {factor}"
            )
        self.latent_size = hp.img_size // factor
        self.latent_channels = self.first_stage.latent_channels
        known_scale = 1.0 if isinstance(self.first_stage, IdentityFirstStage) else hp.scale_factor
        self.register_buffer("scale_factor", torch.tensor(float(known_scale or 0.0)))
        self.conditioner = self.conditioning.build(hp.num_classes, hp.caption_vocabulary)
        extra = self.latent_channels + 1 if hp.inpainting else 0
        self.model = build_denoiser(
            hp.model_name,
            sample_size=self.latent_size,
            in_channels=self.latent_channels + extra,
            out_channels=self.latent_channels,
            context_dim=self.conditioner.dim,
            num_classes=self.conditioner.num_classes,
            model_kwargs=hp.model_kwargs,
        )
        if hp.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.noise_scheduler = self.objective.noise_scheduler()
        self.sharding_units = sharding_block_types(self.model)
        if hp.base_checkpoint is not None:
            self.load_base_checkpoint(hp.base_checkpoint)
        if self.lora is not None:
            from zoo.diffusion.lora import add_lora

            self.requires_grad_(False)
            add_lora(self.model, self.lora)
        self.first_stage.requires_grad_(False)
        self._latent_cache: dict[int, torch.Tensor] = {}

    def load_base_checkpoint(self, path: str) -> None:
        """Weights (denoiser, conditioner, scale factor, first stage) of a ``LatentDiffusion`` checkpoint."""
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"base_checkpoint {str(file)!r} does not exist")
        state = torch.load(file, map_location="cpu", weights_only=True).get("state_dict")
        if not isinstance(state, dict):
            raise ValueError(f"base_checkpoint {str(file)!r} has no state_dict: not a Lightning checkpoint")
        state = rename_keys(state, self.state_dict_renames)
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
        if bucketed and self.hparams.model_name == "dit":
            raise ValueError(
                "resolution_buckets serve non-square images, which diffusers' DiTTransformer2DModel cannot "
                "unpatchify (it assumes square latents): use model_name='unet' or turn the buckets off"
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

    # ----------------------------------------------------------- denoising
    def condition(
        self, batch: dict, dropout: float = 0.0, generator: torch.Generator | None = None
    ) -> Conditioning:
        """The batch's conditions, each replaced by the null condition with probability ``dropout``."""
        n = len(batch["caption"]) if "caption" in batch else len(batch["label"])
        drop = None
        if dropout > 0:
            drop = (torch.rand(n, generator=generator) < dropout).to(self.device)
        return self.conditioner.from_batch(batch, drop)

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        control: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The denoiser's prediction (noise or v), from tensors only (what tracing and export see).

        ``noisy_latents`` is the denoiser's whole input (for an inpainting model: with the mask and the masked
        image's latents concatenated); ``context`` / ``class_labels`` / ``context_mask`` are a ``Conditioning``'s
        fields; ``control`` is a ControlNet's conditioning image (only ``ControlNetDiffusion`` takes one).
        """
        if control is not None:
            raise ValueError("control images need a ControlNetDiffusion model")
        return denoise(self.model, noisy_latents, timesteps, context, class_labels, context_mask)

    def predict(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Conditioning,
        concat: torch.Tensor | None = None,
        control: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``forward`` for a ``Conditioning``, with the inpainting channels ``concat`` appended to the latents."""
        if concat is not None:
            noisy_latents = torch.cat([noisy_latents, concat], dim=1)
        return self(noisy_latents, timesteps, cond.context, cond.class_labels, cond.context_mask, control)

    def example_inputs(self, batch_size: int = 2) -> tuple[torch.Tensor | None, ...]:
        """Noisy latents, timesteps and the null condition's tensors (``None`` where the conditioning has none)."""
        generator = torch.Generator().manual_seed(0)
        side, channels = self.latent_size, self.model.config.in_channels
        latents = torch.randn(batch_size, channels, side, side, generator=generator).to(self.device)
        steps = self.objective.num_train_timesteps
        timesteps = torch.randint(0, steps, (batch_size,), generator=generator).to(self.device)
        with torch.no_grad():
            cond = self.conditioner.null(batch_size, self.device)
        inputs = [latents, timesteps, cond.context, cond.class_labels, cond.context_mask]
        while inputs[-1] is None:
            inputs.pop()
        return tuple(inputs)

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
        """The noise and the timesteps a loss evaluation uses, one per latent (a hook: tests fix them per sample)."""
        return self.objective.draw_noise(latents, generator)

    def diffusion_loss(
        self,
        batch: dict,
        generator: torch.Generator | None = None,
        dropout: float = 0.0,
        training: bool = False,
    ) -> torch.Tensor:
        images = batch["image"]
        latents = self._training_latents(batch) if training else self.encode(images)
        concat = None
        if self.hparams.inpainting:
            masks = random_box_masks(latents.shape[0], images.shape[-1], generator, images.device)
            concat = self._concat_inputs(images, masks)
        cond = self.condition(batch, dropout, generator)
        noise, timesteps = self.draw_noise(batch, latents, generator)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = self.objective.target(self.noise_scheduler, latents, noise, timesteps)
        prediction = self.predict(noisy, timesteps, cond, concat, self.control_image(batch))
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return (per_sample * self.objective.weights(self.noise_scheduler, timesteps)).mean()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.diffusion_loss(batch, dropout=self.conditioning.dropout, training=True)
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

            return self.predict(x, t, cond, tile(concat), tile(control))

        return fn

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

        Unset sampling arguments take the ``sampling`` part's values. ``init_images`` with ``strength`` < 1
        is img2img; ``init_images`` with ``masks`` (1 = fill) is inpainting; ``control_images`` drive a
        ControlNet. The same arguments and seed give the same images.
        """
        defaults = self.sampling
        n = len(labels) if labels is not None else len(captions) if captions is not None else num_samples
        if not n:
            raise ValueError("give labels, captions or num_samples")
        negative = negative_captions or [defaults.negative_prompt] * n
        cond, uncond = self.conditioner.guidance_pair(labels, captions, negative, n, self.device)
        scheduler = build_sampler(sampler or defaults.sampler, self.noise_scheduler)
        generator = torch.Generator().manual_seed(defaults.seed if seed is None else seed)
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
            if self.hparams.inpainting:
                concat = self._concat_inputs(init_images, masks)
        if self.hparams.inpainting and concat is None:  # no mask given: the whole image is the hole
            side, channels = self.hparams.img_size, self.first_stage.image_channels
            blank = torch.zeros(n, channels, side, side, device=self.device)
            concat = self._concat_inputs(blank, torch.ones(n, 1, side, side, device=self.device))
        if control_images is not None:
            control_images = control_images.to(self.device)
        model_fn = guided(
            self._model_fn(concat, control_images),
            cond,
            uncond,
            defaults.guidance_scale if guidance_scale is None else guidance_scale,
        )
        latents = sample(
            model_fn,
            scheduler,
            shape,
            num_inference_steps=steps or defaults.steps,
            generator=generator,
            eta=defaults.eta if eta is None else eta,
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
        return self.generate(
            **self.conditioner.prompts(items),
            num_samples=len(items["image"]),
            control_images=self.control_image(items),
        )

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """One record per prompt of the predict loader (``zoo predict``; ``RecordPredictionWriter`` writes them).

        Record: ``{"id": the prompt line (class name or caption), "prompt": the caption or class sampled,
        "seed": int, "grid": PIL image}``; the grid is one row of ``sampling.samples_per_prompt`` samples.
        Prompt ``i`` of the file is sampled with seed ``sampling.seed + i``, alone, so
        ``generate(labels=[label] * n, seed=seed)`` (or ``captions=``) redraws its grid exactly.
        """
        n = self.sampling.samples_per_prompt
        asked = self.conditioner.prompts(batch)  # {"labels": [...]}, {"captions": [...]} or {}
        records = []
        for i, (name, index) in enumerate(zip(batch["name"], torch.as_tensor(batch["index"]).tolist())):
            seed = self.sampling.seed + index
            one = {key: [values[i]] * n for key, values in asked.items()}
            images = self.generate(**one, num_samples=n, seed=seed)
            grid = make_grid(to_unit_range(images), nrow=n)
            prompt = batch["caption"][i] if "captions" in asked else name
            records.append({"id": name, "prompt": prompt, "seed": seed, "grid": to_pil(grid)})
        return records

    # ----------------------------------------------------------------- LoRA
    def save_lora(self, path: str | Path) -> Path:
        from zoo.diffusion.lora import save_lora_weights

        return save_lora_weights(self.model, path)

    def load_lora(self, path: str | Path) -> None:
        from zoo.diffusion.lora import load_lora_weights

        load_lora_weights(self.model, path)

    def on_train_end(self) -> None:
        if self.lora is not None and self.trainer.is_global_zero and self.trainer.log_dir:
            path = self.save_lora(Path(self.trainer.log_dir) / "lora.safetensors")
            print(f"zoo: LoRA weights written to {path}", flush=True)
