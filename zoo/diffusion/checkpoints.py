"""Checkpoints written before the diffusion modules took their parts as objects, brought up to date.

Earlier ``LatentDiffusion`` / ``ControlNetDiffusion`` checkpoints hold about 40 flat hyper-parameters
(``denoiser``, ``beta_schedule``, ``lora_rank``, ``sampler``...) and the denoiser under ``denoiser.model.``;
earlier ``Autoencoder`` checkpoints hold ``kind``, ``disc_start``... and the autoencoder under
``first_stage.``. ``upgrade_checkpoint`` rewrites both into today's form: hyper-parameters grouped into the
parts (``model_name`` / ``model_kwargs``, ``conditioning``, ``objective``, ``sampling``, ``lora``, ``loss``,
``discriminator``), state-dict keys renamed, and the EMA callback's parameter names with them. A current
checkpoint passes through unchanged.

The modules apply it through ``ZooModule``'s upgrade hooks: ``load_from_checkpoint`` and ``zoo
fit/validate/test/predict --ckpt_path`` read an earlier file as it is (weights and EMA names renamed), and
``zoo upgrade-checkpoint old.ckpt new.ckpt`` rewrites one.
"""

from __future__ import annotations

from typing import Any

__all__ = ["upgrade_autoencoder_arguments", "upgrade_checkpoint", "upgrade_latent_diffusion_arguments"]

#: Hyper-parameters only the earlier flat modules had.
_LDM_MARKERS = ("denoiser", "denoiser_config", "context_dim", "condition_dropout", "beta_schedule", "sampler")
_AUTOENCODER_MARKERS = ("kind", "downsample_factor", "latent_channels", "kl_weight", "disc_start")
_AUTOENCODER_ARCHITECTURE = (
    "downsample_factor",
    "latent_channels",
    "base_channels",
    "channel_multipliers",
    "layers_per_block",
    "num_vq_embeddings",
    "mid_attention",
    "norm_num_groups",
)
_CONDITIONING = {
    "class": "zoo.diffusion.conditioning.ClassConditioning",
    "caption": "zoo.diffusion.conditioning.CaptionConditioning",
    "none": "zoo.diffusion.conditioning.NoConditioning",
}


def _old_kind(hparams: dict) -> str | None:
    if any(key in hparams for key in _LDM_MARKERS):
        return "latent_diffusion"
    if any(key in hparams for key in _AUTOENCODER_MARKERS):
        return "autoencoder"
    return None


def is_current(checkpoint: dict) -> bool:
    """False for a checkpoint written by the earlier, flat-argument diffusion modules."""
    return _old_kind(checkpoint.get("hyper_parameters") or {}) is None


def _upgrade_latent_diffusion(old: dict) -> dict:
    hp = dict(old)
    new: dict[str, Any] = {k: hp.pop(k) for k in ("_class_path", "_instantiator") if k in hp}
    autoencoder = hp.pop("autoencoder", None)
    if isinstance(autoencoder, dict):
        kwargs = dict(autoencoder)
        autoencoder = {"model_name": kwargs.pop("kind", "kl"), "model_kwargs": kwargs}
    channels = hp.pop("in_channels", 3)
    if channels != 3:
        raise ValueError(f"in_channels={channels}: today's LatentDiffusion reads RGB images only")
    new.update(
        autoencoder=autoencoder,
        scale_factor=hp.pop("scale_factor", None),
        scale_estimation_batches=hp.pop("scale_estimation_batches", 8),
        img_size=hp.pop("img_size", 32),
        model_name=hp.pop("denoiser", "unet"),
        model_kwargs=hp.pop("denoiser_config", None),
    )
    kind = hp.pop("conditioning", "class")
    conditioning = {"dim": hp.pop("context_dim", 128), "dropout": hp.pop("condition_dropout", 0.1)}
    caption = {
        "layers": hp.pop("text_layers", 2),
        "heads": hp.pop("text_heads", 4),
        "max_length": hp.pop("max_caption_length", 16),
        "text_encoder_path": hp.pop("text_encoder_path", None),
    }
    if kind == "caption":
        conditioning.update(caption)
    new["conditioning"] = {"class_path": _CONDITIONING[kind], "init_args": conditioning}
    new["num_classes"] = hp.pop("num_classes", 0)
    new["caption_vocabulary"] = hp.pop("caption_vocabulary", None)
    new["objective"] = {
        "beta_schedule": hp.pop("beta_schedule", "linear"),
        "num_train_timesteps": hp.pop("num_train_timesteps", 1000),
        "beta_start": hp.pop("beta_start", 0.0001),
        "beta_end": hp.pop("beta_end", 0.02),
        "prediction_type": hp.pop("prediction_type", "epsilon"),
        "rescale_zero_terminal_snr": hp.pop("rescale_zero_terminal_snr", False),
        "snr_gamma": hp.pop("snr_gamma", None),
        "noise_offset": hp.pop("noise_offset", 0.0),
    }
    new["sampling"] = {
        "sampler": hp.pop("sampler", "dpmsolver++"),
        "steps": hp.pop("sampling_steps", 25),
        "guidance_scale": hp.pop("guidance_scale", 3.0),
        "eta": hp.pop("eta", 0.0),
        "negative_prompt": hp.pop("negative_prompt", ""),
        "samples_per_prompt": hp.pop("samples_per_prompt", 4),
        "seed": hp.pop("seed", 0),
    }
    from dataclasses import fields

    from zoo.diffusion.sampling import SamplingConfig
    from zoo.diffusion.schedules import DiffusionObjective

    for part, cls in (("objective", DiffusionObjective), ("sampling", SamplingConfig)):
        # fields the parts gained later (timestep_range, crop_top_left, ...), where a flat checkpoint has them
        new[part].update({f.name: hp.pop(f.name) for f in fields(cls) if f.name in hp})
    rank, alpha, targets = hp.pop("lora_rank", 0), hp.pop("lora_alpha", None), hp.pop("lora_targets", None)
    new["lora"] = {"rank": rank, "alpha": alpha, "dropout": 0.0, "targets": targets} if rank else None
    new.update(hp)  # the rest kept its name: base_checkpoint, inpainting, ..., and ControlNet's arguments
    return new


def _upgrade_autoencoder(old: dict) -> dict:
    hp = dict(old)
    new: dict[str, Any] = {k: hp.pop(k) for k in ("_class_path", "_instantiator") if k in hp}
    new["model_name"] = hp.pop("kind", "kl")
    new["model_kwargs"] = {k: hp.pop(k) for k in _AUTOENCODER_ARCHITECTURE if k in hp}
    new["img_size"] = hp.pop("img_size", 32)
    new["loss"] = {
        "kl_weight": hp.pop("kl_weight", 1e-6),
        "codebook_weight": hp.pop("codebook_weight", 1.0),
        "perceptual_weight": hp.pop("perceptual_weight", 0.0),
        "perceptual_weights_path": hp.pop("perceptual_weights_path", None),
        "learn_logvar": hp.pop("learn_logvar", True),
    }
    new["discriminator"] = {
        "start": hp.pop("disc_start", 2000),
        "weight": hp.pop("disc_weight", 0.5),
        "factor": hp.pop("disc_factor", 1.0),
        "layers": hp.pop("disc_layers", 3),
        "channels": hp.pop("disc_channels", 64),
        "regularizer": hp.pop("disc_regularizer", "none"),
        "gp_weight": hp.pop("gp_weight", 10.0),
    }
    for key in ("num_logged_images", "channels_last"):  # the rest (values an earlier CLI linked) is dropped
        if key in hp:
            new[key] = hp[key]
    return new


def upgrade_latent_diffusion_arguments(hparams: dict) -> dict:
    """Hyper-parameters of an earlier ``LatentDiffusion`` / ``ControlNetDiffusion`` in today's parts; current
    ones come back unchanged."""
    return _upgrade_latent_diffusion(hparams) if _old_kind(hparams) == "latent_diffusion" else hparams


def upgrade_autoencoder_arguments(hparams: dict) -> dict:
    """Hyper-parameters of an earlier ``Autoencoder`` in today's parts; current ones come back unchanged."""
    return _upgrade_autoencoder(hparams) if _old_kind(hparams) == "autoencoder" else hparams


def upgrade_checkpoint(old: dict) -> dict:
    """A diffusion checkpoint of either module, of either layout, in today's form (for code that reads a file
    before it knows which module wrote it, e.g. a stage-1 autoencoder given to ``LatentDiffusion``)."""
    from zoo.diffusion.autoencoder import Autoencoder
    from zoo.diffusion.module import LatentDiffusion

    kind = _old_kind(old.get("hyper_parameters") or {})
    if kind is None:
        return old
    return (LatentDiffusion if kind == "latent_diffusion" else Autoencoder).upgrade_checkpoint(old)
