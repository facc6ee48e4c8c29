"""Noise schedules and the training objective, on diffusers' schedulers.

``DiffusionObjective`` is ``LatentDiffusion``'s objective part: the forward process (betas, timesteps,
zero-terminal SNR), what the denoiser predicts (noise or v), min-SNR-gamma loss weights and the noise
offset. Training always uses ``DDPMScheduler`` for ``add_noise`` / ``get_velocity`` (the forward process is
the same for every sampler); sampling schedulers are built *from its config*, so the betas, the
zero-terminal-SNR rescaling and the prediction type can never disagree between training and sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

__all__ = [
    "BETA_SCHEDULES",
    "SAMPLERS",
    "DiffusionObjective",
    "build_noise_scheduler",
    "build_sampler",
    "loss_weights",
    "snr",
]

#: YAML names -> diffusers' ``beta_schedule`` names ("cosine" is Nichol & Dhariwal's, capped).
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
SAMPLERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpmsolver++": DPMSolverMultistepScheduler}


def _check_schedule(beta_schedule: str, prediction_type: str, rescale_zero_terminal_snr: bool) -> None:
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"beta_schedule must be one of {sorted(BETA_SCHEDULES)}, got {beta_schedule!r}")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    if rescale_zero_terminal_snr and prediction_type == "epsilon":
        raise ValueError(
            "rescale_zero_terminal_snr needs prediction_type 'v_prediction': at zero SNR the noise "
            "prediction carries no information about the image (Lin et al. 2024)"
        )


def build_noise_scheduler(
    beta_schedule: str = "linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    prediction_type: str = "epsilon",
    rescale_zero_terminal_snr: bool = False,
) -> DDPMScheduler:
    """The training (forward-process) scheduler; every sampler is built from its config."""
    _check_schedule(beta_schedule, prediction_type, rescale_zero_terminal_snr)
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


@dataclass(frozen=True)
class DiffusionObjective:
    """What the denoiser learns: the forward process, the prediction target and the loss weighting.

    Args:
        beta_schedule: ``"linear"``, ``"scaled_linear"`` (Stable Diffusion's) or ``"cosine"``, over
            ``num_train_timesteps`` from ``beta_start`` to ``beta_end``.
        prediction_type: ``"epsilon"`` (the noise) or ``"v_prediction"``.
        rescale_zero_terminal_snr: rescale the betas so the last step is pure noise (needs v-prediction).
        snr_gamma: min-SNR-gamma loss weights (Hang et al. 2023; 5 in the paper); ``None`` weighs steps equally.
        noise_offset: std of a per-channel constant added to the noise, so very dark or bright images are
            reachable (0 to disable).
        timestep_range: ``(low, high)`` fractions of ``num_train_timesteps``: training draws timesteps in
            ``[round(low * T), round(high * T))`` (``None``: all of them). A refiner (SDXL) trains on the low-noise end only, e.g.
            ``(0.0, 0.2)`` for a hand-over at ``denoising_end=0.8``, so all its capacity goes to fine detail.
    """

    beta_schedule: str = "linear"
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    rescale_zero_terminal_snr: bool = False
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    timestep_range: list[float] | None = None

    def __post_init__(self) -> None:
        _check_schedule(self.beta_schedule, self.prediction_type, self.rescale_zero_terminal_snr)
        if self.timestep_range is None:
            return
        # plain floats in a list: what the checkpoint's hparams (and YAML) hold
        object.__setattr__(self, "timestep_range", [float(v) for v in self.timestep_range])
        if len(self.timestep_range) != 2:
            raise ValueError(f"timestep_range is a (low, high) pair of fractions, got {self.timestep_range}")
        low, high = self.timestep_range
        first, end = self.timestep_bounds()
        if not 0.0 <= low < high <= 1.0 or end <= first:
            raise ValueError(
                f"timestep_range must be fractions 0 <= low < high <= 1 holding at least one of the "
                f"{self.num_train_timesteps} timesteps, got {self.timestep_range}"
            )

    def timestep_bounds(self) -> tuple[int, int]:
        """``[first, end)``: the integer timesteps training draws from."""
        low, high = self.timestep_range or (0.0, 1.0)
        return round(low * self.num_train_timesteps), round(high * self.num_train_timesteps)

    def noise_scheduler(self) -> DDPMScheduler:
        return build_noise_scheduler(
            self.beta_schedule,
            self.num_train_timesteps,
            self.beta_start,
            self.beta_end,
            self.prediction_type,
            self.rescale_zero_terminal_snr,
        )

    def draw_noise(
        self, latents: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The noise (with the optional offset) and a random timestep in ``timestep_range`` for each latent."""
        b = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        if self.noise_offset:
            offset = torch.randn((b, latents.shape[1], 1, 1), generator=generator).to(latents)
            noise = noise + self.noise_offset * offset
        first, end = self.timestep_bounds()
        timesteps = torch.randint(first, end, (b,), generator=generator).to(latents.device)
        return noise, timesteps

    def target(
        self, scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """What the denoiser should output for ``latents`` noised with ``noise`` at ``timesteps``."""
        if self.prediction_type == "v_prediction":
            return scheduler.get_velocity(latents, noise, timesteps)
        return noise

    def weights(self, scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weights (min-SNR-gamma, or ones)."""
        return loss_weights(scheduler, timesteps, self.snr_gamma, self.prediction_type)
