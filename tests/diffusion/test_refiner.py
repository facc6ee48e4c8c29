"""SDXL-style refiner: training on the low-noise range, the split schedule and the hand-over from the base."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from zoo.datamodules.captioned_images import CaptionedImageDataModule
from zoo.diffusion import LatentDiffusion, SamplingConfig
from zoo.diffusion.images import make_grid, to_pil, to_unit_range
from zoo.diffusion.refiner import check_refiner, generate_with_refiner
from zoo.diffusion.sampling import guided, sample
from zoo.diffusion.schedules import DiffusionObjective, build_sampler

LOW_NOISE = DiffusionObjective(timestep_range=(0.0, 0.2))


def _model(tiny_ldm_kwargs, seed: int, **overrides) -> LatentDiffusion:
    torch.manual_seed(seed)
    model = LatentDiffusion(**{**tiny_ldm_kwargs, **overrides})
    model.configure_models()
    return model.eval()


def test_the_refiner_trains_only_on_its_timestep_range(tiny_ldm_kwargs, batch):
    refiner = _model(tiny_ldm_kwargs, 0, objective=LOW_NOISE)
    assert refiner.objective.timestep_bounds() == (0, 200)
    drawn = []
    draw = refiner.draw_noise

    def recording(batch, latents, generator=None):
        noise, timesteps = draw(batch, latents, generator)
        drawn.append(timesteps)
        return noise, timesteps

    refiner.draw_noise = recording
    refiner.train()
    for _ in range(20):
        refiner.training_step(batch, 0)
    timesteps = torch.cat(drawn)
    assert len(timesteps) == 160 and timesteps.min() >= 0 and timesteps.max() < 200
    assert timesteps.max() >= 150  # the whole range is drawn, not a corner of it
    full = DiffusionObjective().draw_noise(torch.zeros(4000, 1, 1, 1), torch.Generator().manual_seed(0))[1]
    assert full.max() >= 990  # the default still draws every timestep
    with pytest.raises(ValueError, match="timestep_range must be fractions"):
        DiffusionObjective(timestep_range=(0.5, 0.2))


def _steps_seen(model: LatentDiffusion) -> list[int]:
    seen = []
    forward = model.forward
    model.forward = lambda x, t, *args, **kwargs: seen.append(int(t)) or forward(x, t, *args, **kwargs)
    return seen


def test_the_hand_over_splits_one_schedule_between_base_and_refiner(tiny_ldm_kwargs):
    base = _model(tiny_ldm_kwargs, 0)
    refiner = _model(tiny_ldm_kwargs, 1, objective=LOW_NOISE)
    base_steps, refiner_steps = _steps_seen(base), _steps_seen(refiner)
    images = generate_with_refiner(base, refiner, 0.8, labels=[2, 7], sampler="ddim", steps=10, seed=4)
    full = build_sampler("ddim", base.noise_scheduler)
    full.set_timesteps(10)
    assert base_steps + refiner_steps == full.timesteps.tolist()  # each step once, in order
    assert min(base_steps) >= 200 > max(refiner_steps)

    # the same as running the base's sampler to the switch, then the refiner's from there
    def model_fn(model):
        cond, uncond = model.conditioner.guidance_pair([2, 7], None, None, 2, model.device)
        return guided(lambda x, t, c: model.predict(x, t, c), cond, uncond, 3.0)

    shape = (2, base.latent_channels, base.latent_size, base.latent_size)
    generator = torch.Generator().manual_seed(4)
    half = sample(model_fn(base), build_sampler("ddim", base.noise_scheduler), shape, 10, generator,
                  denoising_end=0.8)  # fmt: skip
    generator = torch.Generator().manual_seed(4)
    rest = sample(model_fn(refiner), build_sampler("ddim", refiner.noise_scheduler), shape, 10, generator,
                  init_latents=half, denoising_start=0.8)  # fmt: skip
    torch.testing.assert_close(images, refiner.decode(rest), rtol=0, atol=0)


def test_a_model_handing_over_to_itself_samples_as_it_does_alone(tiny_ldm_kwargs):
    """Deterministic DDIM has no state but the latents: splitting its schedule changes nothing. (A multistep
    solver restarts its history at the switch, and a stochastic one its noise: close, not equal, as in diffusers.)"""
    base = _model(tiny_ldm_kwargs, 0)
    alone = base.generate(labels=[0, 3], sampler="ddim", steps=8, seed=2, eta=0.0)
    split = generate_with_refiner(base, base, 0.7, labels=[0, 3], sampler="ddim", steps=8, seed=2, eta=0.0)
    torch.testing.assert_close(split, alone, rtol=0, atol=1e-6)


def test_dpm_solver_hands_over_at_the_right_step(tiny_ldm_kwargs):
    base = _model(tiny_ldm_kwargs, 0)
    refiner = _model(tiny_ldm_kwargs, 1, objective=LOW_NOISE)
    base_steps, refiner_steps = _steps_seen(base), _steps_seen(refiner)
    # the sampling part's sampler, DPM-Solver++
    generate_with_refiner(base, refiner, 0.8, labels=[1], steps=12, seed=0)
    full = build_sampler("dpmsolver++", base.noise_scheduler)
    full.set_timesteps(12)
    assert base_steps + refiner_steps == full.timesteps.tolist() and refiner_steps


def test_bad_splits_and_mismatched_pairs_are_refused(tiny_ldm_kwargs):
    base = _model(tiny_ldm_kwargs, 0)
    refiner = _model(tiny_ldm_kwargs, 1, objective=LOW_NOISE)
    for bad in (0.0, 1.0, 1.5, "0.8", True):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            generate_with_refiner(base, refiner, bad, labels=[0])
    with pytest.raises(
        ValueError, match=r"trained on timesteps \[0, 200\) but denoising_end=0.5 hands it \[0, 500\)"
    ):
        generate_with_refiner(base, refiner, 0.5, labels=[0])
    with pytest.raises(ValueError, match="leave no step of the 1-step schedule"):
        generate_with_refiner(base, refiner, 0.8, labels=[0], sampler="ddim", steps=1)
    other = _model(
        tiny_ldm_kwargs, 1, objective=DiffusionObjective(timestep_range=(0.0, 0.2), beta_schedule="cosine")
    )
    with pytest.raises(ValueError, match="same noise schedule: beta_schedule"):
        generate_with_refiner(base, other, 0.8, labels=[0])
    with pytest.raises(ValueError, match="same latent space"):
        check_refiner(base, _model(tiny_ldm_kwargs, 1, scale_factor=0.5), 0.8)
    with pytest.raises(ValueError, match="denoising_start continues given latents"):
        base.generate(labels=[0], denoising_start=0.8)
    with pytest.raises(ValueError, match="latents are continued from denoising_start"):
        base.generate(labels=[0], latents=torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        SamplingConfig(denoising_end=1.0)


def plain_keys(tiny_ldm_kwargs) -> set:
    return _model(tiny_ldm_kwargs, 0).state_dict().keys()


def test_predict_hands_over_to_the_refiner_checkpoint(tiny_ldm_kwargs, tmp_path):
    refiner = LatentDiffusion(**{**tiny_ldm_kwargs, "objective": LOW_NOISE})
    data = CaptionedImageDataModule(train_size=8, val_size=8, test_size=8, batch_size=8, img_size=16)
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(refiner, datamodule=data)
    trainer.save_checkpoint(tmp_path / "refiner.ckpt")
    sampling = SamplingConfig(steps=5, samples_per_prompt=2, denoising_end=0.8)
    base = _model(tiny_ldm_kwargs, 0, sampling=sampling, refiner_checkpoint=str(tmp_path / "refiner.ckpt"))
    prompts = {
        "label": torch.tensor([4]),
        "caption": ["x"],
        "index": torch.tensor([0]),
        "name": ["blue square"],
    }
    record = base.predict_step(prompts, 0)[0]
    loaded = base.refiner()
    assert loaded.objective.timestep_bounds() == (0, 200)
    # the refiner is not in the base's checkpoint
    assert base.state_dict().keys() == plain_keys(tiny_ldm_kwargs)
    expected = generate_with_refiner(base, loaded, 0.8, labels=[4, 4], num_samples=2, seed=0)
    assert np.array_equal(
        np.asarray(record["grid"]), np.asarray(to_pil(make_grid(to_unit_range(expected), nrow=2)))
    )
    plain = _model(tiny_ldm_kwargs, 0, sampling=sampling)
    assert not np.array_equal(
        np.asarray(plain.predict_step(prompts, 0)[0]["grid"]), np.asarray(record["grid"])
    )
