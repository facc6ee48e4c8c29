"""The sampling loop: equal to diffusers' own pipelines, seeded, guided, img2img and inpainting."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from zoo.diffusion.conditioning import Conditioning
from zoo.diffusion.sampling import guided, sample
from zoo.diffusion.schedules import build_noise_scheduler, build_sampler


@pytest.fixture(scope="module")
def unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
    ).eval()


def _ours(unet, scheduler, steps, seed, eta=0.0):
    generator = torch.Generator().manual_seed(seed)
    latents = sample(lambda x, t: unet(x, t).sample, scheduler, (2, 3, 8, 8), steps, generator, eta=eta)
    return (latents / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_loop_reproduces_ddim_pipeline(unet, eta):
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    pipeline = DDIMPipeline(unet=unet, scheduler=scheduler)
    expected = pipeline(
        batch_size=2,
        generator=torch.Generator().manual_seed(7),
        num_inference_steps=10,
        eta=eta,
        output_type="np",
    ).images
    ours = _ours(unet, DDIMScheduler(num_train_timesteps=1000), 10, seed=7, eta=eta)
    assert abs(ours - expected).max() < 1e-5


def test_loop_reproduces_ddpm_pipeline(unet):
    pipeline = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=50))
    expected = pipeline(
        batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=50, output_type="np"
    ).images
    ours = _ours(unet, DDPMScheduler(num_train_timesteps=50), 50, seed=3)
    assert abs(ours - expected).max() < 1e-5


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmsolver++"])
def test_seeded_and_reproducible(unet, name):
    scheduler = build_sampler(name, build_noise_scheduler())
    a = _ours(unet, scheduler, 5, seed=1)
    b = _ours(unet, scheduler, 5, seed=1)
    c = _ours(unet, scheduler, 5, seed=2)
    assert (a == b).all()
    assert abs(a - c).max() > 1e-2


def test_guidance_combines_branches_in_one_batch():
    calls = []

    def model(x, t, cond):
        calls.append(len(x))
        return x * 0 + cond.class_labels.view(-1, 1, 1, 1).float()

    cond, uncond = (
        Conditioning(class_labels=torch.tensor([2, 2])),
        Conditioning(class_labels=torch.tensor([5, 5])),
    )
    x = torch.zeros(2, 1, 2, 2)
    out = guided(model, cond, uncond, 3.0)(x, torch.tensor(10))
    assert calls == [4]  # one doubled batch, not two passes
    assert torch.allclose(out, torch.full_like(x, 5 + 3.0 * (2 - 5)))
    assert torch.allclose(guided(model, cond, uncond, 1.0)(x, torch.tensor(10)), torch.full_like(x, 2.0))


def test_img2img_strength_zero_returns_the_image_and_inpainting_keeps_the_known_region(unet):
    init = torch.randn(2, 3, 8, 8)
    scheduler = build_sampler("ddim", build_noise_scheduler())
    fn = lambda x, t: unet(x, t).sample  # noqa: E731
    same = sample(
        fn, scheduler, init.shape, 10, torch.Generator().manual_seed(0), init_latents=init, strength=0.0
    )
    assert torch.equal(same, init)
    calls = []

    def counting(x, t):
        calls.append(int(t))
        return fn(x, t)

    sample(
        counting, scheduler, init.shape, 10, torch.Generator().manual_seed(0), init_latents=init, strength=0.5
    )
    assert calls == scheduler.timesteps[5:].tolist()  # SDEdit: the last half of the schedule only
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1
    for name in ("ddim", "dpmsolver++"):
        filled = sample(
            fn, build_sampler(name, build_noise_scheduler()), init.shape, 10,
            torch.Generator().manual_seed(0), mask=mask, known_latents=init,
        )  # fmt: skip
        assert torch.allclose(filled * (1 - mask), init * (1 - mask))
        assert (filled * mask - init * mask).abs().max() > 1e-2


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="strength"):
        sample(lambda x, t: x, DDIMScheduler(), (1, 1, 2, 2), 2, strength=1.5)
    with pytest.raises(ValueError, match="known_latents"):
        sample(lambda x, t: x, DDIMScheduler(), (1, 1, 2, 2), 2, mask=torch.ones(1, 1, 2, 2))
    with pytest.raises(ValueError, match="sampler must be one of"):
        build_sampler("euler", build_noise_scheduler())
    with pytest.raises(ValueError, match="v_prediction"):
        build_noise_scheduler(rescale_zero_terminal_snr=True, prediction_type="epsilon")
