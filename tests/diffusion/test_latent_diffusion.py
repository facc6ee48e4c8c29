"""Stage 2: conditioning, training objectives, the scale factor in checkpoints, LoRA and ControlNet."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from zoo.diffusion import (
    ClassConditioning,
    ControlNetDiffusion,
    DiffusionObjective,
    LatentDiffusion,
    LoRAConfig,
    NoConditioning,
)
from zoo.diffusion.conditioning import CaptionConditioner, CaptionConditioning, ClassConditioner
from zoo.diffusion.scale import latent_scale_factor
from zoo.diffusion.schedules import build_noise_scheduler, loss_weights, snr

from .conftest import TINY_DIT, tiny_captions


def _trainer(**kwargs) -> L.Trainer:
    defaults = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return L.Trainer(**{**defaults, **kwargs})


class _Data(L.LightningDataModule):
    def __init__(self, batch: dict) -> None:
        super().__init__()
        self.batch = batch

    def train_dataloader(self) -> DataLoader:
        return DataLoader([self.batch] * 4, batch_size=None)

    val_dataloader = train_dataloader


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"conditioning": tiny_captions()},
        {"conditioning": NoConditioning(dim=16)},
        {"model_name": "dit", "model_kwargs": TINY_DIT},
        {"inpainting": True, "objective": DiffusionObjective(noise_offset=0.1)},
        {
            "objective": DiffusionObjective(
                beta_schedule="cosine",
                prediction_type="v_prediction",
                rescale_zero_terminal_snr=True,
                snr_gamma=5.0,
            )
        },
        {
            "conditioning": tiny_captions(),
            "gradient_checkpointing": True,
            "objective": DiffusionObjective(beta_schedule="scaled_linear"),
        },
        {"autoencoder": None},
    ],
    ids=[
        "class",
        "caption",
        "uncond",
        "dit",
        "inpaint",
        "vpred-zsnr-minsnr-cosine",
        "checkpointing",
        "pixels",
    ],
)
def test_every_variant_trains_and_samples(options, tiny_ldm_kwargs, batch):
    model = LatentDiffusion(**{**tiny_ldm_kwargs, **options})
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model.diffusion_loss(batch, dropout=0.1)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in model.first_stage.parameters())  # frozen
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    model.eval()
    images = model.generate(
        labels=[0, 5] if isinstance(model.conditioning, ClassConditioning) else None,
        captions=["a small red circle in the top left", "a large blue cross"]
        if isinstance(model.conditioning, CaptionConditioning)
        else None,
        num_samples=2,
        steps=2,
    )
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1
    inputs = model.example_inputs(3)  # forward's tensor-only signature, for tracing and export
    assert model(*inputs).shape == (3, model.latent_channels, *inputs[0].shape[-2:])


def test_condition_dropout_substitutes_the_null_condition():
    classes = ClassConditioner(12, 8)
    cond = classes(torch.tensor([3, 4, 5]), drop=torch.tensor([True, False, True]))
    assert cond.class_labels.tolist() == [12, 4, 12]
    assert torch.equal(cond.context[0], classes.null(1, "cpu").context[0])
    with pytest.raises(ValueError, match="class labels must be in"):
        classes(torch.tensor([13]))
    captions = CaptionConditioner(["a", "red", "circle"], dim=8, layers=1, heads=2)
    dropped = captions.from_batch(
        {"caption": ["a red circle", "a red circle"]}, drop=torch.tensor([True, False])
    )
    assert torch.allclose(dropped.context[0], captions.null(1, "cpu").context[0])
    assert not torch.allclose(dropped.context[1], dropped.context[0])


def test_tokenizer_and_caption_errors_are_clear():
    from zoo.diffusion.conditioning import WordTokenizer

    ids, mask = WordTokenizer(["red", "circle"], max_length=5)(["Red circle, purple!", ""])
    assert ids.tolist() == [[1, 4, 5, 3, 2], [1, 2, 0, 0, 0]] and mask.sum().item() == 7
    with pytest.raises(ValueError, match="caption_vocabulary"):
        CaptionConditioner(None)
    with pytest.raises(ValueError, match="class-conditional"):
        LatentDiffusion(
            autoencoder=None, model_name="dit", conditioning=CaptionConditioning(), caption_vocabulary=["a"]
        )
    with pytest.raises(ValueError, match="not divisible"):
        LatentDiffusion(
            autoencoder={"model_kwargs": {"base_channels": 8, "norm_num_groups": 8}},
            img_size=18,
            num_classes=2,
        )


def test_parts_are_checked_and_named_in_errors():
    with pytest.raises(ValueError, match="model_name must be one of"):
        LatentDiffusion(autoencoder=None, model_name="transformer")
    with pytest.raises(ValueError, match=r"architecture.*\['kind'\]"):  # the earlier flat dict
        LatentDiffusion(autoencoder={"kind": "kl"}, num_classes=2)
    with pytest.raises(ValueError, match="not a kind of ConditioningConfig"):
        LatentDiffusion(autoencoder=None, conditioning={"class_path": "ImageConditioning"})
    with pytest.raises(ValueError, match="zoo upgrade-checkpoint"):
        LatentDiffusion(autoencoder=None, conditioning="class", num_classes=2)
    with pytest.raises(ValueError, match="condition dropout"):
        ClassConditioning(dropout=1.0)
    with pytest.raises(ValueError, match="v_prediction"):
        DiffusionObjective(rescale_zero_terminal_snr=True)
    with pytest.raises(ValueError, match="LoRA rank"):
        LoRAConfig(rank=0)
    from zoo.diffusion import SamplingConfig

    with pytest.raises(ValueError, match="sampler must be one of"):
        SamplingConfig(sampler="euler")


def test_dit_keeps_only_our_condition_dropout(tiny_ldm_kwargs):
    model = LatentDiffusion(**{**tiny_ldm_kwargs, "model_name": "dit", "model_kwargs": TINY_DIT}).train()
    x, t = torch.randn(16, 4, 4, 4), torch.randint(0, 1000, (16,))
    cond = model.conditioner(torch.arange(16) % 12)
    assert torch.equal(model.predict(x, t, cond), model.predict(x, t, cond))  # diffusers' own 10% drop is off
    assert model.model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings == 13


def test_min_snr_weights_follow_the_formula():
    scheduler = build_noise_scheduler()
    t = torch.tensor([0, 500, 999])
    s = snr(scheduler, t)
    assert torch.allclose(loss_weights(scheduler, t, 5.0, "epsilon"), s.clamp(max=5) / s)
    assert torch.allclose(loss_weights(scheduler, t, 5.0, "v_prediction"), s.clamp(max=5) / (s + 1))
    assert torch.equal(loss_weights(scheduler, t, None, "epsilon"), torch.ones(3))
    zero = build_noise_scheduler(prediction_type="v_prediction", rescale_zero_terminal_snr=True)
    assert snr(zero, torch.tensor([999])).item() == 0.0
    assert (
        loss_weights(zero, torch.tensor([999]), 5.0, "v_prediction").item() == 1.0
    )  # pure noise still trains


def test_scale_factor_pools_disjoint_batches_over_ranks():
    batches = [{"x": torch.randn(4, 8) * (i + 1)} for i in range(6)]
    stats = {}

    def reduce(rank_stats):  # what an all_reduce(sum) over the two ranks returns
        stats.setdefault("ranks", []).append(rank_stats)
        return rank_stats

    per_rank = [
        latent_scale_factor(lambda b: b["x"], batches, 3, rank=r, world_size=2, all_reduce_sum=reduce)
        for r in (0, 1)
    ]
    pooled = stats["ranks"][0] + stats["ranks"][1]
    everything = torch.cat([b["x"] for b in batches]).double()
    assert pooled[0].item() == everything.numel()  # each batch counted exactly once over the ranks
    from zoo.diffusion.scale import LatentMoments

    assert abs(1 / LatentMoments().std(pooled) - 1 / everything.std().item()) < 1e-9
    assert per_rank[0] != per_rank[1]  # (without a real all-reduce the ranks would disagree)


def test_scale_factor_is_estimated_once_and_travels_in_the_checkpoint(tiny_ldm_kwargs, batch, tmp_path):
    model = LatentDiffusion(**{**tiny_ldm_kwargs, "scale_factor": None, "scale_estimation_batches": 2})
    assert float(model.scale_factor) == 0.0
    with pytest.raises(RuntimeError, match="never estimated"):
        model.generate(labels=[0], steps=1)
    trainer = _trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(model, datamodule=_Data(batch))
    expected = 1 / model.first_stage.encode(torch.cat([batch["image"]] * 2)).double().std().item()
    assert abs(float(model.scale_factor) - expected) < 1e-4
    trainer.save_checkpoint(tmp_path / "ldm.ckpt")
    restored = LatentDiffusion.load_from_checkpoint(tmp_path / "ldm.ckpt")
    assert float(restored.scale_factor) == float(model.scale_factor)
    resumed = LatentDiffusion(**{**tiny_ldm_kwargs, "scale_factor": None})
    resumed.estimate_scale_factor = lambda: pytest.fail("a resumed run must not re-estimate the scale factor")
    _trainer(max_steps=2, limit_val_batches=0).fit(
        resumed, datamodule=_Data(batch), ckpt_path=tmp_path / "ldm.ckpt"
    )
    assert float(resumed.scale_factor) == float(model.scale_factor)


def test_generation_is_seeded_and_guidance_changes_it(tiny_ldm_kwargs):
    model = LatentDiffusion(**tiny_ldm_kwargs).eval()
    a = model.generate(labels=[1, 2], steps=3, seed=4)
    assert torch.equal(a, model.generate(labels=[1, 2], steps=3, seed=4))
    assert not torch.equal(a, model.generate(labels=[1, 2], steps=3, seed=5))
    assert not torch.equal(a, model.generate(labels=[1, 2], steps=3, seed=4, guidance_scale=1.0))
    captions = LatentDiffusion(**{**tiny_ldm_kwargs, "conditioning": tiny_captions()}).eval()
    plain = captions.generate(captions=["a red circle"], steps=2)
    negative = captions.generate(captions=["a red circle"], negative_captions=["a blue square"], steps=2)
    assert not torch.equal(plain, negative)


def test_img2img_and_inpainting_from_the_module(tiny_ldm_kwargs, batch):
    model = LatentDiffusion(**{**tiny_ldm_kwargs, "inpainting": True}).eval()
    images = batch["image"][:2]
    masks = torch.zeros(2, 1, 16, 16)
    masks[..., 4:12, 4:12] = 1
    decoded = []
    decode = model.decode
    model.decode = lambda latents: decoded.append(latents) or decode(latents)
    model.generate(labels=[0, 1], init_images=images, masks=masks, steps=3)
    keep = 1 - torch.nn.functional.interpolate(masks, size=(4, 4))  # latent cells outside the hole
    assert torch.allclose(decoded[0] * keep, model.encode(images) * keep, atol=1e-5)
    assert not torch.allclose(decoded[0] * (1 - keep), model.encode(images) * (1 - keep), atol=1e-2)
    edited = model.generate(labels=[0, 1], init_images=images, strength=0.3, steps=3)
    assert edited.shape == images.shape
    with pytest.raises(ValueError, match="init_images"):
        model.generate(labels=[0, 1], masks=masks)


def test_lora_trains_adapters_only_and_saves_them_apart(tiny_ldm_kwargs, batch, tmp_path):
    base = LatentDiffusion(**tiny_ldm_kwargs)
    trainer = _trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(base, datamodule=_Data(batch))
    trainer.save_checkpoint(tmp_path / "base.ckpt")
    lora = LatentDiffusion(
        **{**tiny_ldm_kwargs, "base_checkpoint": str(tmp_path / "base.ckpt"), "lora": LoRAConfig(rank=4)}
    )
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in lora.named_parameters() if not p.requires_grad}
    _trainer(max_steps=2, limit_val_batches=0).fit(lora, datamodule=_Data(batch))
    assert all(torch.equal(p, frozen_before[n]) for n, p in lora.named_parameters() if not p.requires_grad)
    path = lora.save_lora(tmp_path / "lora.safetensors")
    base_size = (tmp_path / "base.ckpt").stat().st_size
    assert path.stat().st_size < base_size / 5
    fresh = LatentDiffusion(
        **{**tiny_ldm_kwargs, "base_checkpoint": str(tmp_path / "base.ckpt"), "lora": LoRAConfig(rank=4)}
    ).eval()
    lora.eval()
    x, t, cond = torch.randn(2, 4, 4, 4), torch.tensor([10, 500]), lora.conditioner(torch.tensor([1, 2]))
    assert not torch.allclose(fresh.predict(x, t, cond), lora.predict(x, t, cond))
    fresh.load_lora(path)
    assert torch.allclose(fresh.predict(x, t, cond), lora.predict(x, t, cond), atol=1e-6)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        LatentDiffusion(**tiny_ldm_kwargs).load_lora(path)


def test_controlnet_starts_as_the_base_and_trains_alone(tiny_ldm_kwargs, batch, tmp_path):
    base = LatentDiffusion(**tiny_ldm_kwargs)
    trainer = _trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(base, datamodule=_Data(batch))
    trainer.save_checkpoint(tmp_path / "base.ckpt")
    control = ControlNetDiffusion(**{**tiny_ldm_kwargs, "base_checkpoint": str(tmp_path / "base.ckpt")})
    assert {n.split(".")[0] for n, p in control.named_parameters() if p.requires_grad} == {"controlnet"}
    base.eval(), control.eval()
    x, t, cond = torch.randn(2, 4, 4, 4), torch.tensor([10, 500]), base.conditioner(torch.tensor([1, 2]))
    edges = control.control_image(batch)[:2]
    assert edges.shape == (2, 1, 16, 16) and set(edges.unique().tolist()) <= {0.0, 1.0}
    expected = base.predict(x, t, cond)
    assert torch.allclose(control.predict(x, t, cond, control=edges), expected, atol=1e-6)  # zero convs
    loss = control.diffusion_loss(batch)
    loss.backward()
    assert control.controlnet.controlnet_mid_block.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="control image"):
        control.predict(x, t, cond)
    with pytest.raises(ValueError, match="ControlNetDiffusion model"):
        base.predict(x, t, cond, control=edges)
    samples = control.generate(labels=[0, 1], control_images=edges, steps=2)
    assert samples.shape == (2, 3, 16, 16)
    inputs = control.example_inputs()
    assert control(*inputs).shape == (2, 4, 4, 4) and inputs[-1].shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="separate runs"):
        ControlNetDiffusion(**{**tiny_ldm_kwargs, "lora": LoRAConfig(rank=2)})


def test_latent_cache_encodes_each_image_once_and_changes_nothing(tiny_ldm_kwargs, batch):
    cached = LatentDiffusion(**{**tiny_ldm_kwargs, "cache_latents": True})
    plain = LatentDiffusion(**tiny_ldm_kwargs)
    plain.load_state_dict(cached.state_dict())
    calls = []
    encode = cached.first_stage.encode
    cached.first_stage.encode = lambda images, **kw: calls.append(len(images)) or encode(images, **kw)
    for _ in range(2):
        losses = [
            m.diffusion_loss(batch, generator=torch.Generator().manual_seed(1), training=True)
            for m in (cached, plain)
        ]
        assert torch.allclose(losses[0], losses[1])
    assert calls == [len(batch["image"])]  # the second pass came from the cache
