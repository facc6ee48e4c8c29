"""SDXL's refiner: a second denoiser for the low-noise end of the schedule, and the hand-over to it.

A base model spends its capacity on every noise level, most of it on composition; a refiner (Podell et al.
2023, section 2.5) is a ``LatentDiffusion`` in the same latent space trained only on the last, low-noise
timesteps (``objective: {timestep_range: [0.0, 0.2]}``), where fine detail is decided. Sampling splits one
schedule (diffusers' SDXL "ensemble of experts"): the base denoises pure noise down to ``denoising_end``
(0.8: the timesteps ``>= round(T - 0.8 T)``) and returns still-noisy latents; the refiner continues the same
schedule from there (``denoising_start=0.8``) without re-noising. The two calls are ``LatentDiffusion.generate``
with those arguments; this module checks that the pair fits together and runs them.
"""

from __future__ import annotations

import torch

from zoo.diffusion.sampling import check_split, split_timestep

__all__ = ["check_refiner", "generate_with_refiner", "load_refiner"]

#: Objective fields that define the forward process: base and refiner must share them.
_SCHEDULE_FIELDS = (
    "beta_schedule",
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "rescale_zero_terminal_snr",
)


def check_refiner(base, refiner, denoising_end: float) -> None:
    """Refuse a pair that cannot share one schedule: different latent spaces, forward processes, or a
    refiner never trained on the timesteps it would be handed."""
    check_split(denoising_end, "denoising_end")
    base_shape = (base.latent_channels, base.latent_size, float(base.scale_factor))
    refiner_shape = (refiner.latent_channels, refiner.latent_size, float(refiner.scale_factor))
    if base_shape != refiner_shape:
        raise ValueError(
            f"base and refiner need the same latent space: (channels, size, scale_factor) {base_shape} vs "
            f"{refiner_shape}"
        )
    for name in _SCHEDULE_FIELDS:
        if getattr(base.objective, name) != getattr(refiner.objective, name):
            raise ValueError(
                f"base and refiner need the same noise schedule: {name} is {getattr(base.objective, name)!r} vs "
                f"{getattr(refiner.objective, name)!r}"
            )
    switch = split_timestep(denoising_end, base.objective.num_train_timesteps)
    first, end = refiner.objective.timestep_bounds()
    if first > 0 or end < switch:
        raise ValueError(
            f"the refiner was trained on timesteps [{first}, {end}) but denoising_end={denoising_end} hands it "
            f"[0, {switch}): raise denoising_end to at least {1 - end / base.objective.num_train_timesteps:.2f} "
            "or train the refiner on that range"
        )


@torch.no_grad()
def generate_with_refiner(
    base,
    refiner,
    denoising_end: float = 0.8,
    sampler: str | None = None,
    steps: int | None = None,
    seed: int | None = None,
    **conditions,
) -> torch.Tensor:
    """Images in [-1, 1]: ``base.generate`` to ``denoising_end`` of a ``steps``-step schedule, then
    ``refiner.generate`` over the rest of it from those latents.

    ``conditions`` (``labels``/``captions``/``num_samples``, ``guidance_scale``, ``original_size``...) go to both
    models, each through its own conditioner; the sampler, steps and seed default to the base's ``sampling``
    part, so both halves are one schedule. ``steps`` counts the whole schedule: the total cost is one model
    call per step, as for the base alone.
    """
    check_refiner(base, refiner, denoising_end)
    sampler = sampler or base.sampling.sampler
    steps = steps or base.sampling.steps
    seed = base.sampling.seed if seed is None else seed
    common = {"sampler": sampler, "steps": steps, "seed": seed}
    refiner_conditions = dict(conditions)
    if refiner.micro is None:  # SDXL's refiner has its own micro-conditions; a plain one takes none
        refiner_conditions.pop("original_size", None)
        refiner_conditions.pop("crop_top_left", None)
    latents = base.generate(**conditions, **common, denoising_end=denoising_end, output_type="latent")
    return refiner.generate(
        **refiner_conditions, **common, latents=latents.to(refiner.device), denoising_start=denoising_end
    )


def load_refiner(path: str):
    """A refiner checkpoint (a ``LatentDiffusion``; its EMA weights where it has them), in eval mode."""
    from zoo.diffusion.evaluation import load_latent_diffusion

    return load_latent_diffusion(path)
