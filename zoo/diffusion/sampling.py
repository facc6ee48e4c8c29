"""The sampling loop, written once over any diffusers scheduler (DDPM, DDIM, DPM-Solver++...).

It is diffusers' pipeline loop (``set_timesteps``, ``scale_model_input``, ``step``) with nothing of the
pipelines' packaging, so it works on any model function, and it adds what the stage-2 module needs:

- classifier-free guidance (``guided``): conditional and unconditional (or negative-prompt) branches
  in one doubled batch, ``uncond + scale * (cond - uncond)``;
- img2img (SDEdit, Meng et al. 2022): start from the clean latents noised to ``strength`` of the way;
- inpainting by blending: after every step the known region is replaced by the known latents noised
  to the next timestep, so only the masked region is generated (with any model; a model trained with
  concatenated masks also gets them as input);
- a split schedule (SDXL's base + refiner hand-over): ``denoising_end`` stops at a fraction of the schedule
  and returns the still-noisy latents, ``denoising_start`` continues from such latents over the rest of the
  *same* schedule (``zoo.diffusion.refiner`` runs one model, then the other);
- reproducibility: all noise comes from one ``torch.Generator`` via diffusers' ``randn_tensor``, so
  the same seed, model and scheduler give the same images as diffusers' own pipelines (tested against
  ``DDIMPipeline``).

``SamplingConfig`` is ``LatentDiffusion``'s sampling part: the defaults of ``generate`` and ``zoo predict``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor

from zoo.diffusion.schedules import SAMPLERS

__all__ = ["SamplingConfig", "check_split", "guided", "sample", "split_timestep"]


@dataclass(frozen=True)
class SamplingConfig:
    """How a model samples unless told otherwise (``generate``'s defaults, and all of ``zoo predict``).

    Args:
        sampler: ``"ddpm"``, ``"ddim"`` or ``"dpmsolver++"`` (DPM-Solver++ 2M).
        steps: inference steps.
        guidance_scale: classifier-free guidance; 1 samples the conditional model alone.
        eta: DDIM's stochasticity (0 deterministic, 1 DDPM-like).
        negative_prompt: the unconditional branch's caption (captions only; "" is the null caption).
        samples_per_prompt: images per prompt in ``zoo predict``, one grid row each.
        seed: the first prompt's seed; prompt ``i`` of ``zoo predict`` uses ``seed + i``.
        original_size / crop_top_left: a micro-conditioned model's size and crop (pixels, ``(h, w)`` and
            ``(top, left)``); ``None``: "uncropped, full size", the image size and ``(0, 0)``.
        denoising_end: with a refiner (``refiner_checkpoint``), the fraction of the schedule the base denoises
            before handing over (SDXL's ensemble of experts uses 0.8).
    """

    sampler: str = "dpmsolver++"
    steps: int = 25
    guidance_scale: float = 3.0
    eta: float = 0.0
    negative_prompt: str = ""
    samples_per_prompt: int = 4
    seed: int = 0
    original_size: list[int] | None = None
    crop_top_left: list[int] | None = None
    denoising_end: float = 0.8

    def __post_init__(self) -> None:
        for name in ("original_size", "crop_top_left"):  # plain ints in a list, as the checkpoint holds them
            if getattr(self, name) is not None:
                object.__setattr__(self, name, [int(v) for v in getattr(self, name)])
        check_split(self.denoising_end, "denoising_end")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {self.sampler!r}")
        if self.steps < 1 or self.samples_per_prompt < 1:
            raise ValueError(
                f"steps and samples_per_prompt must be >= 1, got {self.steps} and {self.samples_per_prompt}"
            )


ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_split(fraction: float, name: str) -> float:
    """A hand-over point: a float strictly between 0 and 1, as diffusers' SDXL pipelines require."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise ValueError(
            f"{name} must be a fraction of the schedule strictly between 0 and 1, got {fraction!r}"
        )
    return float(fraction)


def split_timestep(fraction: float, num_train_timesteps: int) -> int:
    """The timestep where a schedule split at ``fraction`` hands over: the first part denoises the timesteps
    ``>=`` it, the second those below (diffusers' ``round(T - fraction * T)``)."""
    return round(num_train_timesteps - fraction * num_train_timesteps)


def _split_schedule(timesteps: torch.Tensor, scheduler, start: float | None, end: float | None):
    """``(first index, timesteps)`` of the part of a full schedule between ``start`` and ``end``."""
    total = scheduler.config.num_train_timesteps
    first, last = 0, len(timesteps)
    if start is not None:
        first = int((timesteps >= split_timestep(check_split(start, "denoising_start"), total)).sum())
    if end is not None:
        last = int((timesteps >= split_timestep(check_split(end, "denoising_end"), total)).sum())
    if last <= first:
        raise ValueError(
            f"denoising_start={start} / denoising_end={end} leave no step of the {len(timesteps)}-step schedule "
            f"(timesteps {timesteps.tolist()}): use more steps or move the split"
        )
    return first, timesteps[first:last]


def guided(model_fn: Callable, cond, uncond, guidance_scale: float) -> ModelFn:
    """Classifier-free guidance around ``model_fn(x, t, cond)``; scale 1 skips the unconditional pass."""
    if guidance_scale == 1.0:
        return lambda x, t: model_fn(x, t, cond)
    both = cond.cat(uncond)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out_cond, out_uncond = model_fn(torch.cat([x, x]), t, both).chunk(2)
        return out_uncond + guidance_scale * (out_cond - out_uncond)

    return fn


def _step_kwargs(scheduler, generator, eta: float) -> dict:
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "generator" in accepted:
        kwargs["generator"] = generator
    if "eta" in accepted:
        kwargs["eta"] = eta
    return kwargs


@torch.no_grad()
def sample(
    model_fn: ModelFn,
    scheduler,
    shape: tuple[int, ...],
    num_inference_steps: int = 50,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    init_latents: torch.Tensor | None = None,
    strength: float = 1.0,
    mask: torch.Tensor | None = None,
    known_latents: torch.Tensor | None = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    denoising_start: float | None = None,
    denoising_end: float | None = None,
) -> torch.Tensor:
    """Run the reverse process and return the final latents.

    Args:
        model_fn: ``(latents, t) -> model output`` in the scheduler's prediction type.
        scheduler: a diffusers scheduler (it is reset by ``set_timesteps``).
        shape: latent shape ``(B, C, H, W)``.
        init_latents / strength: img2img; ``strength`` 1 ignores the image, 0 returns it.
        mask / known_latents: inpainting; ``mask`` is 1 where to generate, 0 where ``known_latents`` stay.
        callback: called as ``callback(i, t, latents)`` after every step.
        denoising_start / denoising_end: run only the part of the ``num_inference_steps`` schedule between
            these fractions (SDXL's hand-over). With ``denoising_start``, ``init_latents`` are the previous
            part's output, already noisy at the switch: they are continued, not re-noised (``strength`` is
            ignored). With ``denoising_end`` the still-noisy latents at the switch are returned.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if (mask is None) != (known_latents is None):
        raise ValueError("inpainting needs both mask and known_latents")
    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps
    noise = randn_tensor(shape, generator=generator, device=torch.device(device), dtype=dtype)
    if denoising_start is not None or denoising_end is not None:
        if denoising_start is not None and init_latents is None:
            raise ValueError("denoising_start continues given latents: pass the first part's init_latents")
        first, timesteps = _split_schedule(timesteps, scheduler, denoising_start, denoising_end)
        if first and hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(first)
        latents = noise * scheduler.init_noise_sigma if denoising_start is None else init_latents
    elif init_latents is not None and strength < 1.0:
        order = getattr(scheduler, "order", 1)
        start = min(int(num_inference_steps * (1.0 - strength)), num_inference_steps) * order
        timesteps = timesteps[start:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        if len(timesteps) == 0:
            return init_latents
        latents = scheduler.add_noise(init_latents, noise, timesteps[:1].repeat(shape[0]))
    else:
        latents = noise * scheduler.init_noise_sigma
    kwargs = _step_kwargs(scheduler, generator, eta)
    for i, t in enumerate(timesteps):
        model_input = scheduler.scale_model_input(latents, t)
        output = model_fn(model_input, t)
        latents = scheduler.step(output, t, latents, **kwargs).prev_sample
        if mask is not None:
            if i + 1 < len(timesteps):
                known = scheduler.add_noise(known_latents, noise, timesteps[i + 1 : i + 2].repeat(shape[0]))
            else:
                known = known_latents
            latents = mask * latents + (1 - mask) * known
        if callback is not None:
            callback(i, t, latents)
    return latents
