"""SDXL-style micro-conditioning: the crop data, the path into the time embedding, sampling defaults, errors."""

from __future__ import annotations

import pytest
import torch

from zoo.datamodules.captioned_images import CaptionedImageDataModule
from zoo.datamodules.shapes import render_shapes
from zoo.diffusion import LatentDiffusion, SamplingConfig
from zoo.diffusion.micro_conditioning import MicroConditioning, micro_time_ids

from .conftest import TINY_DIT, tiny_captions

MICRO = MicroConditioning(embed_dim=8)


def _model(tiny_ldm_kwargs, **overrides) -> LatentDiffusion:
    model = LatentDiffusion(**{**tiny_ldm_kwargs, "micro_conditioning": MICRO, **overrides})
    model.configure_models()
    return model.eval()


def _crop_batch(n: int = 8) -> dict:
    data = CaptionedImageDataModule(
        train_size=n, val_size=n, test_size=n, batch_size=n, img_size=16, crop_scales=[1.0, 2.0]
    )
    data.setup()
    torch.manual_seed(3)
    return data._collate([data.train_set[i] for i in range(n)])


def test_random_crops_carry_their_original_size_and_position():
    batch = _crop_batch()
    assert batch["original_size"].shape == batch["crop_top_left"].shape == (8, 2)
    sides = set(batch["original_size"][:, 0].tolist())
    assert sides == {16, 32}  # both scales drawn
    for i in range(8):
        (side, _), (top, left) = batch["original_size"][i].tolist(), batch["crop_top_left"][i].tolist()
        scene = torch.from_numpy(render_shapes(i, seed=0, split="train", image_size=side, noise=0.0).image)
        expected = scene[top : top + 16, left : left + 16].permute(2, 0, 1).float() / 127.5 - 1
        assert torch.equal(batch["image"][i], expected)
        assert 0 <= top <= side - 16 and 0 <= left <= side - 16
        if side == 16:
            assert (top, left) == (0, 0)
    plain = CaptionedImageDataModule(train_size=4, val_size=4, test_size=4, img_size=16, crop_scales=[2.0])
    plain.setup()
    validation = plain._collate([plain.val_set[i] for i in range(4)])
    assert "original_size" not in validation  # uncropped: the model takes "uncropped, full size"


def test_micro_conditions_reach_the_time_embedding_and_change_the_output(tiny_ldm_kwargs):
    model = _model(tiny_ldm_kwargs)
    unet = model.model
    assert unet.config.addition_embed_type == "text_time" and unet.add_embedding.linear_1.in_features == 6 * 8
    seen = []
    unet.add_time_proj.register_forward_hook(lambda module, args, out: seen.append(args[0].clone()))
    x, t, context, labels = *model.example_inputs(2)[:3], torch.tensor([1, 2])
    uncropped = torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)
    cropped = torch.tensor([[32.0, 32, 16, 8, 16, 16]] * 2)
    with torch.no_grad():
        a = model(x, t, context, labels, time_ids=uncropped)
        b = model(x, t, context, labels, time_ids=cropped)
        default = model(x, t, context, labels)  # no ids: "uncropped, full size"
    assert torch.equal(seen[0], uncropped.flatten()) and torch.equal(seen[1], cropped.flatten())
    assert (a - b).abs().max() > 1e-4
    assert torch.equal(a, default)
    # the ids act only through the added embedding: silence it and the crop no longer matters
    with torch.no_grad():
        unet.add_embedding.linear_2.weight.zero_()
        unet.add_embedding.linear_2.bias.zero_()
        assert torch.equal(
            model(x, t, context, labels, time_ids=uncropped), model(x, t, context, labels, time_ids=cropped)
        )


def test_training_reads_the_batch_crops(tiny_ldm_kwargs):
    model = _model(tiny_ldm_kwargs)
    batch = _crop_batch()
    cond = model.condition(batch)
    expected = torch.cat([batch["original_size"], batch["crop_top_left"], torch.full((8, 2), 16)], 1)
    assert torch.equal(cond.time_ids, expected.float())
    loss = model.diffusion_loss(batch, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert model.model.add_embedding.linear_1.weight.grad.abs().sum() > 0


def test_sampling_defaults_to_uncropped_full_size_and_is_overridable(tiny_ldm_kwargs):
    model = _model(tiny_ldm_kwargs)
    seen = []
    model.model.add_time_proj.register_forward_hook(
        lambda module, args, out: seen.append(args[0].view(-1, 6))
    )
    default = model.generate(labels=[0, 5], seed=1)
    assert seen[0].tolist() == [[16, 16, 0, 0, 16, 16]] * 4  # cond + uncond of guidance
    explicit = model.generate(labels=[0, 5], seed=1, original_size=(16, 16), crop_top_left=(0, 0))
    assert torch.equal(default, explicit)
    cropped = model.generate(labels=[0, 5], seed=1, original_size=(32, 32), crop_top_left=(16, 8))
    assert (default - cropped).abs().max() > 1e-4
    configured = _model(
        tiny_ldm_kwargs, sampling=SamplingConfig(steps=3, original_size=[32, 32], crop_top_left=[16, 8])
    )
    configured.load_state_dict(model.state_dict())
    assert torch.equal(configured.generate(labels=[0, 5], seed=1), cropped)


def test_caption_models_take_micro_conditions_too(tiny_ldm_kwargs):
    model = _model(tiny_ldm_kwargs, conditioning=tiny_captions())
    batch = _crop_batch(4)
    assert torch.isfinite(model.diffusion_loss(batch, generator=torch.Generator().manual_seed(0)))
    a = model.generate(captions=["a red circle"], seed=0)
    b = model.generate(captions=["a red circle"], seed=0, original_size=(32, 32), crop_top_left=(16, 16))
    assert (a - b).abs().max() > 1e-4


def test_a_crop_outside_the_image_is_refused_with_its_values(tiny_ldm_kwargs):
    model = _model(tiny_ldm_kwargs)
    with pytest.raises(
        ValueError, match=r"crop_top_left=\(20, 0\).*original_size=\(32, 32\).*crop_top <= 16"
    ):
        model.generate(labels=[0], original_size=(32, 32), crop_top_left=(20, 0))
    with pytest.raises(ValueError, match=r"crop_top_left=\(-1, 0\)"):
        micro_time_ids((16, 16), (-1, 0), (16, 16))
    batch = _crop_batch(2)
    batch["crop_top_left"][1] = torch.tensor([0, 40])
    with pytest.raises(ValueError, match=r"crop_top_left=\(0, 40\)"):
        model.condition(batch)
    plain = LatentDiffusion(**tiny_ldm_kwargs)
    plain.configure_models()
    with pytest.raises(ValueError, match="need a model with micro_conditioning"):
        plain.generate(labels=[0], crop_top_left=(0, 0))
    with pytest.raises(ValueError, match="model_name='unet'"):
        LatentDiffusion(
            **{**tiny_ldm_kwargs, "model_name": "dit", "model_kwargs": TINY_DIT, "micro_conditioning": MICRO}
        )
    with pytest.raises(ValueError, match="crop_scales must be scales >= 1"):
        CaptionedImageDataModule(train_size=2, val_size=2, test_size=2, crop_scales=[0.5]).setup()


def test_a_micro_conditioned_checkpoint_reloads(tiny_ldm_kwargs, tmp_path):
    import lightning as L

    model = LatentDiffusion(**{**tiny_ldm_kwargs, "micro_conditioning": MICRO})
    data = CaptionedImageDataModule(
        train_size=8, val_size=8, test_size=8, batch_size=8, img_size=16, crop_scales=[1, 2]
    )
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(model, datamodule=data)
    trainer.save_checkpoint(tmp_path / "micro.ckpt")
    restored = LatentDiffusion.load_from_checkpoint(tmp_path / "micro.ckpt").eval()
    assert restored.micro == MICRO
    assert torch.equal(restored.generate(labels=[1], seed=0), model.eval().generate(labels=[1], seed=0))
