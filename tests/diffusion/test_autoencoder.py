"""Stage 1: diffusers autoencoders built from (kind, f, channels); LDM's loss under manual optimization."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from zoo.diffusion.autoencoder import Autoencoder
from zoo.diffusion.losses import (
    AutoencoderLoss,
    DiscriminatorConfig,
    PatchDiscriminator,
    adaptive_generator_weight,
    gradient_penalty,
    hinge_discriminator_loss,
    hinge_generator_loss,
)
from zoo.diffusion.model import FirstStage, build_autoencoder, load_first_stage
from zoo.diffusion.perceptual import PerceptualLoss


def _loader(batch: dict) -> DataLoader:
    return DataLoader([batch], batch_size=None)


TINY_ARCHITECTURE = {"base_channels": 8, "norm_num_groups": 8}


def _tiny(model_name: str = "kl", latent_channels: int = 4, **discriminator) -> Autoencoder:
    return Autoencoder(
        model_name=model_name,
        model_kwargs={**TINY_ARCHITECTURE, "latent_channels": latent_channels},
        img_size=16,
        discriminator=DiscriminatorConfig(channels=8, layers=2, **discriminator),
    )


@pytest.mark.parametrize("kind", ["kl", "vq"])
@pytest.mark.parametrize("factor", [4, 8, 16])
def test_downsampling_factor_and_latent_channels(kind, factor):
    stage = FirstStage(build_autoencoder(kind, factor, latent_channels=3, base_channels=8, norm_num_groups=8))
    images = torch.randn(2, 3, 32, 32)
    latents = stage.encode(images)
    assert latents.shape == (2, 3, 32 // factor, 32 // factor)
    assert stage.downsample_factor == factor and stage.latent_channels == 3
    assert stage.decode(latents).shape == images.shape


def test_bad_architecture_is_named():
    with pytest.raises(ValueError, match="power of two"):
        build_autoencoder("kl", 6)
    with pytest.raises(ValueError, match="model_name must be one of"):
        build_autoencoder("vae")
    with pytest.raises(ValueError, match="model_name must be one of"):
        Autoencoder(model_name="vae")
    with pytest.raises(ValueError, match="channel_multipliers needs"):
        build_autoencoder("kl", 4, channel_multipliers=[1, 2])
    with pytest.raises(ValueError, match="regularizer must be one of"):
        _tiny(regularizer="wgan")


def test_losses_match_their_definitions():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    assert torch.isclose(hinge_discriminator_loss(real, fake), torch.tensor(0.5 * (0.25 + 0.75)))
    assert torch.isclose(hinge_generator_loss(fake), torch.tensor(0.75))
    w = torch.ones(3, requires_grad=True)
    rec, gan = (3 * w).sum(), (w * torch.tensor([1.0, 0.0, 0.0])).sum()
    expected = torch.tensor(3.0 * 3**0.5 / (1.0 + 1e-4))
    assert torch.isclose(adaptive_generator_weight(rec, gan, w), expected)
    x = torch.randn(2, 3, requires_grad=True)
    assert torch.isclose(gradient_penalty((2 * x).sum(1), x), torch.tensor(12.0))  # |grad|^2 = 3 * 4


def test_patch_discriminator_spectral_norm_replaces_batchnorm():
    plain, sn = (
        PatchDiscriminator(channels=8, num_layers=2),
        PatchDiscriminator(channels=8, num_layers=2, spectral_norm=True),
    )
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in sn.modules())
    assert plain(torch.randn(2, 3, 16, 16)).shape == sn(torch.randn(2, 3, 16, 16)).shape == (2, 1, 2, 2)


def test_perceptual_loss_needs_a_local_weights_file(tmp_path):
    with pytest.raises(ValueError, match="perceptual_weights_path"):
        Autoencoder(model_kwargs=TINY_ARCHITECTURE, loss=AutoencoderLoss(perceptual_weight=1.0))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PerceptualLoss(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"")
    torch.save({"nothing": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="does not hold PerceptualLoss weights"):
        PerceptualLoss(tmp_path / "bad.pt")


def test_perceptual_loss_from_a_weights_file(tmp_path):
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in PerceptualLoss.architecture().state_dict().items()}
    weights = {k: torch.rand(shape) * 0.1 for k, shape in shapes.items()}
    torch.save(weights, tmp_path / "lpips.pt")
    loss = PerceptualLoss(tmp_path / "lpips.pt")
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(loss(x, x), torch.zeros(2), atol=1e-6)
    assert (loss(x, y) > 0).all()
    assert not any(p.requires_grad for p in loss.parameters())


@pytest.mark.parametrize("kind,regularizer", [("kl", "gradient_penalty"), ("vq", "spectral_norm")])
def test_two_optimizers_with_a_delayed_discriminator(batch, kind, regularizer):
    model = _tiny(kind, start=1, regularizer=regularizer)
    model.configure_optimizers = lambda: [  # plain Adam, as the configs use
        torch.optim.Adam([*model.model.parameters(), model.logvar], 1e-3),
        torch.optim.Adam(model.discriminator.parameters(), 1e-3),
    ]
    disc_before = [p.detach().clone() for p in model.discriminator.parameters()]
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(model, _loader(batch))
    # the first step only trains the autoencoder: the discriminator starts at generator step 1
    assert int(model.generator_steps) == 1 and trainer.global_step == 1
    assert all(torch.equal(a, b) for a, b in zip(disc_before, model.discriminator.parameters()))
    trainer = L.Trainer(max_epochs=2, limit_train_batches=1, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(model, _loader(batch))
    assert int(model.generator_steps) == 3
    metrics = trainer.callback_metrics
    assert "train/d_weight" in metrics and "train/d_loss" in metrics
    assert ("train/gradient_penalty" in metrics) == (regularizer == "gradient_penalty")
    assert ("train/kl" in metrics) == (kind == "kl") and ("train/codebook" in metrics) == (kind == "vq")
    assert not all(torch.equal(a, b) for a, b in zip(disc_before, model.discriminator.parameters()))


def test_validation_logs_psnr_ssim_and_latent_statistics(batch):
    model = _tiny()
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(model, _loader(batch), verbose=False)[0]
    for key in ("val/psnr", "val/ssim", "val/latent_mean", "val/latent_std", "val/rec_loss"):
        assert key in metrics
    from torchmetrics.functional.image import peak_signal_noise_ratio

    model.eval()
    with torch.no_grad():
        recon = model(batch["image"])
    expected = peak_signal_noise_ratio(
        (recon / 2 + 0.5).clamp(0, 1), batch["image"] / 2 + 0.5, data_range=1.0
    )
    assert abs(metrics["val/psnr"] - expected.item()) < 1e-4


def test_reconstructions_as_example_inputs_and_predict_records(batch):
    model = _tiny().eval()
    (images,) = model.example_inputs(3)
    assert model(images).shape == images.shape == (3, 3, 16, 16)
    records = model.predict_step({"image": batch["image"][:2], "id": ["a.png", "b.png"]}, 0)
    assert [r["id"] for r in records] == ["a.png", "b.png"]
    assert records[0]["reconstruction"].size == (16, 16)
    with pytest.raises(ValueError, match="reconstructs images"):
        model.predict_step({"caption": ["a red circle"]}, 0)


def test_stage_one_checkpoint_and_diffusers_dir_load_as_frozen_first_stage(tmp_path, batch):
    model = _tiny("kl", latent_channels=3).eval()
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    model.configure_optimizers = lambda: [torch.optim.Adam(model.model.parameters(), 1e-3),
                                          torch.optim.Adam(model.discriminator.parameters(), 1e-3)]  # fmt: skip
    trainer.fit(model, _loader(batch))
    trainer.save_checkpoint(tmp_path / "ae.ckpt")
    model.eval()
    expected = model(batch["image"])
    for source in (tmp_path / "ae.ckpt", tmp_path / "diffusers"):
        if source.name == "diffusers":
            model.model.autoencoder.save_pretrained(source)
        stage = load_first_stage(str(source))
        assert not any(p.requires_grad for p in stage.parameters()) and not stage.training
        assert torch.allclose(stage.decode(stage.encode(batch["image"])), expected, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_first_stage(str(tmp_path / "nope.ckpt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_first_stage(str(tmp_path / "empty"))
