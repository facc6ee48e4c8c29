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
- LoRA: ``LoRAConfig`` or ``None`` (``zoo.lora``);
- SDXL's micro-conditioning on original size and crop: ``MicroConditioning`` or ``None``
  (``zoo.diffusion.micro_conditioning``).

A refiner is a ``LatentDiffusion`` whose objective trains only the low-noise end of the schedule
(``DiffusionObjective.timestep_range``); ``refiner_checkpoint`` makes ``predict_step`` hand each sample over
to it (``zoo.diffusion.refiner``).

Optional spatial conditioning by concatenation (inpainting: a mask and the masked image's latents),
gradient checkpointing and a latent cache are flags. EMA is the ``zoo.callbacks.EMA`` callback; mixed
precision is the trainer's ``precision``.

``zoo export`` writes the networks of sampling as separate graphs (``export_graphs``): the denoiser, the
decoder, and the caption encoder where there is one; the sampling loop, the scheduler and the tokenizer stay
in Python around them. ``library_exports`` adds diffusers' pipeline folder and LoRA adapter files.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from diffusers.models.upsampling import Upsample2D
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from zoo.base import ZooModule, rename_keys
from zoo.diffusion.checkpoints import upgrade_latent_diffusion_arguments
from zoo.diffusion.conditioning import (
    CaptionConditioner,
    ClassConditioner,
    ClassConditioning,
    Conditioning,
    ConditioningConfig,
)
from zoo.diffusion.images import make_grid, to_pil, to_unit_range
from zoo.diffusion.micro_conditioning import MicroConditioning
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

__all__ = [
    "LatentDiffusion",
    "batch_graph",
    "caption_tokens",
    "exportable_upsampling",
    "first_stage_networks",
    "random_box_masks",
    "read_networks",
]


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


# ---------------------------------------------------------------------------------------------- export
class _ExportableUpsample2D(Upsample2D):
    """diffusers' ``Upsample2D`` making its input contiguous at every batch size, not only from 64 samples on
    (a CUDA kernel's limit): that branch on the batch size is what ``torch.export`` would turn into a bound of
    63 on the dynamic batch. ``contiguous()`` changes no value, so this is the same function everywhere."""

    def forward(self, hidden_states: torch.Tensor, output_size=None, *args, **kwargs) -> torch.Tensor:
        if self.norm is not None or self.use_conv_transpose or not self.interpolate:
            return super().forward(hidden_states, output_size, *args, **kwargs)
        hidden_states = hidden_states.contiguous()
        if output_size is None:
            hidden_states = F.interpolate(hidden_states, scale_factor=2.0, mode="nearest")
        else:
            hidden_states = F.interpolate(hidden_states, size=output_size, mode="nearest")
        if self.use_conv:
            hidden_states = (self.conv if self.name == "conv" else self.Conv2d_0)(hidden_states)
        return hidden_states


def exportable_upsampling(network: nn.Module) -> nn.Module:
    """``network`` with its ``Upsample2D`` layers made ``_ExportableUpsample2D`` in place (same weights, same
    outputs), so that its exported graph takes any batch size."""
    for module in network.modules():
        if type(module) is Upsample2D:
            module.__class__ = _ExportableUpsample2D
    return network


def batch_graph(name: str, module: nn.Module, example: Callable[[int], dict[str, torch.Tensor]],
                output_names: tuple[str, ...]):  # fmt: skip
    """An ``ExportGraph`` of ``module`` traced on ``example(2)`` and checked on ``example(3)`` (named inputs),
    every input with a dynamic batch (axis 0)."""
    from zoo.export import ExportGraph

    with torch.no_grad():
        inputs, check = example(2), example(3)
    return ExportGraph(
        name=name,
        module=module.eval(),
        inputs=tuple(inputs.values()),
        check_inputs=tuple(check.values()),
        input_names=tuple(inputs),
        output_names=output_names,
        dynamic_dims=tuple({0: "batch"} for _ in inputs),
    )


#: Captions the caption encoder and the denoiser are traced with (the empty one is the null caption).
_EXAMPLE_CAPTIONS = ("a small red circle in the top left", "", "a large blue square in the centre")


class _DenoiserGraph(nn.Module):
    """``LatentDiffusion.forward`` on the tensors a sampling loop holds, passed in the order of ``names``.

    A class label's token is one row of an embedding, looked up here rather than in a graph of its own
    (``ClassConditioner.forward`` without its check of the label range, a branch on values); an
    unconditional model's null token is a constant of the graph.
    """

    def __init__(self, diffusion: LatentDiffusion, names: tuple[str, ...]) -> None:
        super().__init__()
        self.names = names
        self.denoise = diffusion.forward  # a bound method, not a submodule: see ``read_networks``
        self.networks = read_networks(
            model=diffusion.model,
            controlnet=getattr(diffusion, "controlnet", None),
            conditioner=None if "context" in names else diffusion.conditioner,
        )

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        given = dict(zip(self.names, tensors))
        latents = given["latents"]
        if "class_labels" in given:
            labels = given["class_labels"]
            embedding = self.networks["conditioner"].embedding
            cond = Conditioning(context=embedding(labels)[:, None], class_labels=labels)
        elif "context" in given:
            cond = Conditioning(context=given["context"], context_mask=given["context_mask"])
        else:
            cond = self.networks["conditioner"].null(latents.shape[0], latents.device)
        return self.denoise(
            latents,
            given["timesteps"],
            cond.context,
            cond.class_labels,
            cond.context_mask,
            given.get("control"),
        )


class _TextEncoderGraph(nn.Module):
    """Token ids and their mask -> the denoiser's ``context`` and ``context_mask``: the caption conditioner
    after its tokenizer (the zoo's word tokenizer, or CLIP's), which stays in Python."""

    def __init__(self, conditioner: CaptionConditioner) -> None:
        super().__init__()
        self.conditioner = conditioner

    def forward(self, token_ids: torch.Tensor, token_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.conditioner.clip is not None:  # CLIP's text model attends to the padding, as the zoo's call
            context = self.conditioner.clip.model(input_ids=token_ids).last_hidden_state
        else:
            context = self.conditioner.encoder(token_ids, token_mask)
        return context, token_mask.to(context.dtype)


def caption_tokens(conditioner: CaptionConditioner, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token_ids, token_mask)`` of ``captions`` as the caption conditioner tokenizes them (padded to its
    maximum length): the inputs of an exported ``text_encoder``."""
    if conditioner.clip is not None:
        tokens = conditioner.clip.tokenizer(
            captions, padding="max_length", truncation=True, return_tensors="pt"
        )
        return tokens.input_ids, tokens.attention_mask.bool()
    return conditioner.tokenizer(captions)


class _LatentCodec(nn.Module):
    """The first stage between images in [-1, 1] and *scaled* latents (``LatentDiffusion.encode`` /
    ``decode``), the scale factor a constant of the graph."""

    def __init__(self, first_stage: nn.Module, scale: float, direction: str) -> None:
        super().__init__()
        self.call = getattr(first_stage, direction)  # a bound method, not a submodule: see ``read_networks``
        self.networks = read_networks(**first_stage_networks(first_stage, direction))
        self.scale = scale
        self.direction = direction

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.direction == "encode":
            return self.call(tensor) * self.scale
        return self.call(tensor / self.scale).clamp(-1, 1)


def read_networks(**networks: nn.Module | None) -> nn.ModuleDict:
    """The networks a graph module reads, to register on it in place of their owner: ``torch.export`` saves
    every weight of the module it traces, so a graph module holding the whole ``LatentDiffusion`` would carry
    the autoencoder in the denoiser's file. The graph module calls its owner's method, which reaches these
    same networks."""
    return nn.ModuleDict({name: network for name, network in networks.items() if network is not None})


def first_stage_networks(first_stage: nn.Module, direction: str) -> dict[str, nn.Module]:
    """The parts of a ``FirstStage``'s diffusers autoencoder that ``encode`` or ``decode`` reads (none for pixel
    space): the encoder and ``quant_conv``, or the decoder, ``post_quant_conv`` and VQ's codebook."""
    autoencoder = getattr(first_stage, "autoencoder", None)
    names = ("encoder", "quant_conv") if direction == "encode" else ("decoder", "post_quant_conv", "quantize")
    return {n: getattr(autoencoder, n) for n in names if isinstance(getattr(autoencoder, n, None), nn.Module)}


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
        compile: ``torch.compile`` the denoiser (``self.model``) when a trainer sets the module up: ``true``, or a
            dict of ``torch.compile`` options (``mode``, ``fullgraph``, ``dynamic``, ``backend``, ``options``);
            checkpoints are the same as without it (``ZooModule.compile_network``).
        micro_conditioning: condition the UNet on each image's original size and crop (SDXL; the data's
            ``crop_scales``), ``MicroConditioning``; sampling defaults to "uncropped, full size".
        refiner_checkpoint: a ``LatentDiffusion`` checkpoint trained on the low-noise end of the schedule;
            ``zoo predict`` then denoises to ``sampling.denoising_end`` with this model and the rest with it.
    """

    replicated_modules = ("first_stage",)  # frozen, and encode/decode run outside forward
    state_dict_renames = (("denoiser.model.", "model."),)
    #: The constructor arguments that are parts, and the class each resolves to (``zoo.parts``).
    parts: ClassVar[dict[str, type]] = {
        "conditioning": ConditioningConfig,
        "objective": DiffusionObjective,
        "sampling": SamplingConfig,
        "lora": LoRAConfig,
        "micro_conditioning": MicroConditioning,
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
        compile: bool | dict = False,
        micro_conditioning: MicroConditioning | None = None,
        refiner_checkpoint: str | None = None,
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
        micro_conditioning = plain_part(micro_conditioning, MicroConditioning)
        if micro_conditioning is not None and model_name != "unet":
            raise ValueError(
                f"micro_conditioning needs model_name='unet' (diffusers' added time embedding), got {model_name!r}"
            )
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler)

    # ------------------------------------------------------------- set-up
    def configure_models(self) -> None:
        hp = self.hparams
        self.conditioning = resolve_part(hp.conditioning, ConditioningConfig)
        self.objective = resolve_part(hp.objective, DiffusionObjective)
        self.sampling = resolve_part(hp.sampling, SamplingConfig)
        self.lora = resolve_part(hp.lora, LoRAConfig)
        self.micro = resolve_part(hp.get("micro_conditioning"), MicroConditioning)
        self._refiner: list[LatentDiffusion] = []  # loaded on first use, not a submodule: not checkpointed
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
            model_kwargs={**(hp.model_kwargs or {}), **(self.micro.unet_kwargs() if self.micro else {})},
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

    def sharded_submodules(self) -> list[nn.Module]:
        """diffusers' DiT runs its first block's timestep and class embedding again, outside that block, for the
        final layer's modulation: under FSDP2 that embedding is a unit of its own, gathered for that call."""
        units = super().sharded_submodules()
        if self.hparams.model_name == "dit":
            units.insert(0, self.model.transformer_blocks[0].norm1.emb)
        return units

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
        data_hparams = getattr(datamodule, "hparams", None)
        if self.hparams.cache_latents and getattr(data_hparams, "random_flip", False):
            raise ValueError("cache_latents needs unaugmented data: the data module has random_flip=True")
        if self.hparams.cache_latents and getattr(data_hparams, "crop_scales", None):
            raise ValueError(
                "cache_latents needs unaugmented data: the data module has random crops (crop_scales)"
            )
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
        cond = self.conditioner.from_batch(batch, drop)
        if self.micro is not None:
            cond.time_ids = self.micro.from_batch(batch, self._target_size, self.device)
        return cond

    @property
    def _target_size(self) -> tuple[int, int]:
        return (self.hparams.img_size, self.hparams.img_size)

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        control: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The denoiser's prediction (noise or v), from tensors only (what tracing and export see).

        ``noisy_latents`` is the denoiser's whole input (for an inpainting model: with the mask and the masked
        image's latents concatenated); ``context`` / ``class_labels`` / ``context_mask`` are a ``Conditioning``'s
        fields; ``control`` is a ControlNet's conditioning image (only ``ControlNetDiffusion`` takes one);
        ``time_ids`` a micro-conditioned model's size and crop ids, "uncropped, full size" when not given.
        """
        if control is not None:
            raise ValueError("control images need a ControlNetDiffusion model")
        if self.micro is not None and time_ids is None:
            time_ids = self.micro.time_ids(
                noisy_latents.shape[0], self._target_size, device=noisy_latents.device
            )
        elif self.micro is None and time_ids is not None:
            raise ValueError("time_ids need a model with micro_conditioning")
        return denoise(
            self.model, noisy_latents, timesteps, context, class_labels, context_mask, time_ids=time_ids
        )

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
        micro = {} if cond.time_ids is None else {"time_ids": cond.time_ids}
        return self(
            noisy_latents, timesteps, cond.context, cond.class_labels, cond.context_mask, control, **micro
        )

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
        return self.per_sample_losses(batch, generator, dropout, training).mean()

    def per_sample_losses(
        self,
        batch: dict,
        generator: torch.Generator | None = None,
        dropout: float = 0.0,
        training: bool = False,
    ) -> torch.Tensor:
        """(B,) weighted denoising losses, one per image: DreamBooth averages its instance and class halves
        of one batch apart."""
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
        return per_sample * self.objective.weights(self.noise_scheduler, timesteps)

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
        original_size: tuple[int, int] | None = None,
        crop_top_left: tuple[int, int] | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "image",
    ) -> torch.Tensor:
        """Images in [-1, 1], one per label / caption (or ``num_samples`` unconditional ones).

        Unset sampling arguments take the ``sampling`` part's values. ``init_images`` with ``strength`` < 1
        is img2img; ``init_images`` with ``masks`` (1 = fill) is inpainting; ``control_images`` drive a
        ControlNet. ``original_size`` / ``crop_top_left`` are a micro-conditioned model's (default: the
        ``sampling`` part's, "uncropped, full size"). ``denoising_end`` stops at that fraction of the schedule
        (``output_type="latent"`` returns the still-noisy latents); ``denoising_start`` continues such
        ``latents`` (SDXL's base/refiner hand-over, ``zoo.diffusion.refiner``). The same arguments and seed
        give the same images.
        """
        if output_type not in ("image", "latent"):
            raise ValueError(f"output_type must be 'image' or 'latent', got {output_type!r}")
        defaults = self.sampling
        n = len(labels) if labels is not None else len(captions) if captions is not None else num_samples
        if not n:
            raise ValueError("give labels, captions or num_samples")
        negative = negative_captions or [defaults.negative_prompt] * n
        cond, uncond = self.conditioner.guidance_pair(labels, captions, negative, n, self.device)
        if self.micro is not None:
            size = original_size or defaults.original_size
            crop = crop_top_left or defaults.crop_top_left or (0, 0)
            cond.time_ids = uncond.time_ids = self.micro.time_ids(
                n, self._target_size, size, crop, self.device
            )
        elif original_size is not None or crop_top_left is not None:
            raise ValueError("original_size / crop_top_left need a model with micro_conditioning")
        scheduler = build_sampler(sampler or defaults.sampler, self.noise_scheduler)
        generator = torch.Generator().manual_seed(defaults.seed if seed is None else seed)
        shape = (n, self.latent_channels, self.latent_size, self.latent_size)
        concat = init_latents = mask_small = known = None
        if init_images is not None:
            init_images = init_images.to(self.device)
            init_latents = self.encode(init_images)
        if latents is not None:
            if denoising_start is None:
                raise ValueError(
                    "latents are continued from denoising_start: give it (init_images for img2img)"
                )
            init_latents = latents.to(self.device)
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
        out = sample(
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
            denoising_start=denoising_start,
            denoising_end=denoising_end,
        )
        return out if output_type == "latent" else self.decode(out)

    def samples_for_batch(self, batch: dict, n: int) -> torch.Tensor:
        """``n`` samples conditioned like the first ``n`` items of a data batch (for logging)."""
        items = {k: v[:n] for k, v in batch.items()}
        return self.generate(
            **self.conditioner.prompts(items),
            num_samples=len(items["image"]),
            control_images=self.control_image(items),
        )

    def refiner(self) -> LatentDiffusion | None:
        """The ``refiner_checkpoint`` model (its EMA weights where it has them), loaded on first use."""
        if self.hparams.get("refiner_checkpoint") and not self._refiner:
            from zoo.diffusion.refiner import load_refiner

            self._refiner.append(load_refiner(self.hparams.refiner_checkpoint))
        return self._refiner[0].to(self.device) if self._refiner else None

    def _sample_prompt(self, conditions: dict, n: int, seed: int) -> torch.Tensor:
        """``n`` samples of one prompt: this model alone, or handing over to the refiner."""
        refiner = self.refiner()
        if refiner is None:
            return self.generate(**conditions, num_samples=n, seed=seed)
        from zoo.diffusion.refiner import generate_with_refiner

        return generate_with_refiner(
            self, refiner, self.sampling.denoising_end, num_samples=n, seed=seed, **conditions
        )

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """One record per prompt of the predict loader (``zoo predict``; ``RecordPredictionWriter`` writes them).

        Record: ``{"id": the prompt line (class name or caption), "prompt": the caption or class sampled,
        "seed": int, "grid": PIL image}``; the grid is one row of ``sampling.samples_per_prompt`` samples.
        Prompt ``i`` of the file is sampled with seed ``sampling.seed + i``, alone, so
        ``generate(labels=[label] * n, seed=seed)`` (or ``captions=``) redraws its grid exactly. A batch may
        carry ``"seed"`` and ``"id"`` lists (``zoo serve``'s requests): an item's own seed and id, where not
        ``None``, replace these.
        """
        n = self.sampling.samples_per_prompt
        asked = self.conditioner.prompts(batch)  # {"labels": [...]}, {"captions": [...]} or {}
        names = list(batch["name"])
        seeds, ids = batch.get("seed") or [None] * len(names), batch.get("id") or [None] * len(names)
        records = []
        for i, (name, index) in enumerate(zip(names, torch.as_tensor(batch["index"]).tolist())):
            seed = self.sampling.seed + index if seeds[i] is None else int(seeds[i])
            one = {key: [values[i]] * n for key, values in asked.items()}
            images = self._sample_prompt(one, n, seed)
            grid = make_grid(to_unit_range(images), nrow=n)
            prompt = batch["caption"][i] if "captions" in asked else name
            record_id = name if ids[i] is None else ids[i]
            records.append({"id": record_id, "prompt": prompt, "seed": seed, "grid": to_pil(grid)})
        return records

    # --------------------------------------------------------------- export
    def export_graphs(self) -> list:
        """What ``zoo export --format pt2|onnx`` writes, every graph with a dynamic batch:

        - ``denoiser``: ``latents`` (the denoiser's whole input, with an inpainting model's extra channels),
          ``timesteps`` (int64, one per sample) and the conditioning's tensors -> ``prediction`` (noise or v).
          Class models take ``class_labels`` (``num_classes`` is the null class), caption models ``context``
          and ``context_mask``, unconditional models nothing more; a ControlNet adds ``control``;
        - ``text_encoder`` (caption models): ``token_ids``, ``token_mask`` -> ``context``, ``context_mask``;
        - ``decoder``: scaled latents -> images in [-1, 1]; ``encoder`` (inpainting models): images -> scaled
          latents, for the masked image's channels.

        The sampling loop stays in Python: the scheduler, classifier-free guidance (which doubles the batch:
        conditional then null condition) and the tokenizer (``caption_tokens``), as in ``generate``.
        diffusers' upsampling layers are made export-friendly in place (``exportable_upsampling``).
        """
        from zoo.export import ExportError

        if float(self.scale_factor) == 0.0:
            raise ExportError(
                "the decoder graph needs the latent scale_factor, which was never estimated: export a trained "
                "checkpoint (--ckpt_path), or pass --model.init_args.scale_factor"
            )
        scale = float(self.scale_factor)
        exportable_upsampling(self.model)
        exportable_upsampling(self.first_stage)
        names = tuple(self._denoiser_example(2))
        graphs = [
            batch_graph("denoiser", _DenoiserGraph(self, names), self._denoiser_example, ("prediction",))
        ]
        if isinstance(self.conditioner, CaptionConditioner):

            def tokens(n: int) -> dict[str, torch.Tensor]:
                captions = [_EXAMPLE_CAPTIONS[i % len(_EXAMPLE_CAPTIONS)] for i in range(n)]
                ids, mask = caption_tokens(self.conditioner, captions)
                return {"token_ids": ids.to(self.device), "token_mask": mask.to(self.device)}

            text_encoder = _TextEncoderGraph(self.conditioner)
            graphs.append(batch_graph("text_encoder", text_encoder, tokens, ("context", "context_mask")))

        def latents(n: int) -> dict[str, torch.Tensor]:
            return {"latents": self._denoiser_example(n)["latents"][:, : self.latent_channels]}

        decoder = _LatentCodec(self.first_stage, scale, "decode")
        graphs.append(batch_graph("decoder", decoder, latents, ("images",)))
        if self.hparams.inpainting:

            def images(n: int) -> dict[str, torch.Tensor]:
                return {"images": decoder(latents(n)["latents"])}

            encoder = _LatentCodec(self.first_stage, scale, "encode")
            graphs.append(batch_graph("encoder", encoder, images, ("latents",)))
        return graphs

    @torch.no_grad()
    def _denoiser_example(self, batch_size: int) -> dict[str, torch.Tensor]:
        """The denoiser graph's inputs by name: ``example_inputs`` with real conditions (labels drawn over
        every class and the null class, captions encoded) instead of the null condition alone."""
        example = self.example_inputs(batch_size)
        inputs = {"latents": example[0], "timesteps": example[1]}
        if isinstance(self.conditioner, ClassConditioner):
            generator = torch.Generator().manual_seed(batch_size)
            labels = torch.randint(0, self.conditioner.num_classes + 1, (batch_size,), generator=generator)
            inputs["class_labels"] = labels.to(self.device)
        elif isinstance(self.conditioner, CaptionConditioner):
            captions = [_EXAMPLE_CAPTIONS[i % len(_EXAMPLE_CAPTIONS)] for i in range(batch_size)]
            cond = self.conditioner(captions)
            inputs["context"], inputs["context_mask"] = cond.context, cond.context_mask
        if len(example) > 5:  # ControlNetDiffusion: forward's control image
            inputs["control"] = example[5]
        return inputs

    def library_exports(self) -> dict[str, Callable[[Path], list[Path]]]:
        """diffusers' formats for ``zoo export --format``: ``diffusers`` (a pipeline folder) and
        ``diffusers-lora`` (the LoRA adapters), written by ``zoo.diffusion.pipeline_export``, which is
        imported only when one of them is asked for."""

        def pipeline(folder: Path) -> list[Path]:
            from zoo.diffusion.pipeline_export import write_diffusers_pipeline

            return write_diffusers_pipeline(self, folder)

        def lora(folder: Path) -> list[Path]:
            from zoo.diffusion.pipeline_export import write_lora_adapter

            return write_lora_adapter(self, folder)

        return {"diffusers": pipeline, "diffusers-lora": lora}

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
