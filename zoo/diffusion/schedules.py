"""Noise schedules and the training objective's pieces, on diffusers' schedulers.

Training always uses ``DDPMScheduler`` for ``add_noise`` / ``get_velocity`` (the forward process is
the same for every sampler); sampling schedulers are built *from its config*, so the betas, the
zero-terminal-SNR rescaling and the prediction type can never disagree between training and sampling.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

__all__ = ["BETA_SCHEDULES", "SAMPLERS", "build_noise_scheduler", "build_sampler", "loss_weights", "snr"]

#: YAML names -> diffusers' ``beta_schedule`` names ("cosine" is Nichol & Dhariwal's, capped).
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
SAMPLERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpmsolver++": DPMSolverMultistepScheduler}


def build_noise_scheduler(
    beta_schedule: str = "linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    prediction_type: str = "epsilon",
    rescale_zero_terminal_snr: bool = False,
) -> DDPMScheduler:
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"beta_schedule must be one of {sorted(BETA_SCHEDULES)}, got {beta_schedule!r}")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    if rescale_zero_terminal_snr and prediction_type == "epsilon":
        raise ValueError(
            "rescale_zero_terminal_snr needs prediction_type 'v_prediction': at zero SNR the noise "
            "prediction carries no information about the image (Lin et al. 2024)"
        )
    with torch.device("cpu"):  # the schedule's tables are CPU tensors even under a meta/cuda default device
        return DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=BETA_SCHEDULES[beta_schedule],
            prediction_type=prediction_type,
            clip_sample=False,
            rescale_betas_zero_snr=rescale_zero_terminal_snr,
            timestep_spacing="trailing" if rescale_zero_terminal_snr else "leading",
        )


def build_sampler(name: str, noise_scheduler: DDPMScheduler):
    """A fresh sampling scheduler sharing ``noise_scheduler``'s forward process."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {name!r}")
    config = dict(noise_scheduler.config)
    extra = {}
    if name == "ddim":
        extra = {"set_alpha_to_one": False} if config.get("rescale_betas_zero_snr") else {}
    elif name == "dpmsolver++":
        extra = {"algorithm_type": "dpmsolver++", "solver_order": 2}
        if config.get("rescale_betas_zero_snr"):
            extra["final_sigmas_type"] = "zero"
    with torch.device("cpu"):
        return SAMPLERS[name].from_config(config, **extra)


def snr(noise_scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ``alpha_bar / (1 - alpha_bar)`` at each timestep."""
    alphas = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas / (1.0 - alphas)


def loss_weights(
    noise_scheduler: DDPMScheduler, timesteps: torch.Tensor, snr_gamma: float | None, prediction_type: str
) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023) per sample; ones without ``snr_gamma``.

    ``min(SNR, gamma) / SNR`` for noise prediction, ``min(SNR, gamma) / (SNR + 1)`` for v-prediction; a
    zero-SNR step (zero-terminal schedules) gets weight 1 rather than a division by zero.
    """
    if snr_gamma is None:
        return torch.ones(timesteps.shape, device=timesteps.device)
    values = snr(noise_scheduler, timesteps)
    clipped = values.clamp(max=snr_gamma)
    weights = clipped / (values + 1) if prediction_type == "v_prediction" else clipped / values
    return torch.where(values == 0, torch.ones_like(weights), weights)
