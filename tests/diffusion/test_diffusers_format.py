"""A trained LatentDiffusion as a diffusers pipeline folder and a diffusers LoRA file: loaded by diffusers,
they sample and denoise exactly as the zoo does (same seed, same steps)."""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open

from zoo.diffusion import (
    CaptionConditioning,
    ClassConditioning,
    ControlNetDiffusion,
    DiffusionObjective,
    LatentDiffusion,
    LoRAConfig,
    NoConditioning,
    SamplingConfig,
)
from zoo.diffusion.images import to_unit_range
from zoo.diffusion.model import denoise
from zoo.diffusion.pipeline_export import (
    LORA_WEIGHT_NAME,
    ZooLatentDiffusionPipeline,
    write_diffusers_pipeline,
    write_lora_adapter,
)
from zoo.errors import ZooError

from .conftest import TINY_AE, TINY_DIT, TINY_UNET, tiny_captions

ROOT = Path(__file__).resolve().parents[2]
TINY_AE_YAML = (
    "{model_name: kl, model_kwargs: {downsample_factor: 4, latent_channels: 4, base_channels: 8, "
    "norm_num_groups: 8}}"
)
TINY_UNET_YAML = (
    "{block_out_channels: [16, 32], down_block_types: [CrossAttnDownBlock2D, DownBlock2D], "
    "up_block_types: [UpBlock2D, CrossAttnUpBlock2D], norm_num_groups: 8, attention_head_dim: 2}"
)
TINY_DIT_YAML = "{num_layers: 2, num_attention_heads: 2, attention_head_dim: 16, patch_size: 2}"
#: Sampling parity asked of the loaded pipeline, on [0, 1] images (0 measured for the zoo's pipeline class,
#: 3e-7 for the stock DiTPipeline, whose scheduler steps a doubled batch).
IMAGE_TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def _modules_cache(tmp_path_factory, monkeypatch):
    """diffusers copies a folder's pipeline.py into its modules cache before importing it: keep that here."""
    import diffusers.utils.dynamic_modules_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path_factory.getbasetemp() / "hf_modules"))


def _config_model(config: str, *overrides: str) -> LatentDiffusion:
    """A model of a shipped config with tiny networks (as ``zoo export`` builds it), its weights perturbed."""
    from zoo.inference import load_trained_model

    denoiser = TINY_DIT_YAML if "dit" in config else TINY_UNET_YAML
    args = [
        "--config",
        str(ROOT / "configs" / "diffusion" / config),
        f"--model.init_args.autoencoder={TINY_AE_YAML}",
        f"--model.init_args.model_kwargs={denoiser}",
        "--model.init_args.scale_factor=0.7",
        "--model.init_args.sampling.steps=3",
        "--data.init_args.img_size=16",
        *overrides,
    ]
    return _perturbed(load_trained_model(args, None).module)


def _model(**options) -> LatentDiffusion:
    from zoo.datamodules.captioned_images import shapes_caption_vocabulary

    kwargs = {
        "autoencoder": dict(TINY_AE),
        "scale_factor": 0.7,
        "img_size": 16,
        "model_kwargs": dict(TINY_UNET),
        "conditioning": ClassConditioning(dim=16),
        "num_classes": 12,
        "caption_vocabulary": shapes_caption_vocabulary(),
        "sampling": SamplingConfig(steps=3),
    }
    return _perturbed(LatentDiffusion(**{**kwargs, **options}))


def _perturbed(module: LatentDiffusion) -> LatentDiffusion:
    """Noise on every trainable weight, so that zero-initialised layers (DiT's adaLN-Zero, LoRA's B) and
    equal label rows cannot hide a wrong class, null class or adapter."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.requires_grad and not name.startswith("first_stage."):
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return module.eval()


def _zoo_images(module: LatentDiffusion, seed: int = 3, **prompts) -> np.ndarray:
    return to_unit_range(module.generate(**prompts, seed=seed)).permute(0, 2, 3, 1).numpy()


def _pipeline_images(pipeline, seed: int = 3, **prompts) -> np.ndarray:
    return pipeline(**prompts, generator=torch.Generator().manual_seed(seed), output_type="np").images


@pytest.mark.parametrize("config", ["ldm_dit_class.yaml", "ldm_unet_class.yaml"])
def test_class_configs_load_in_diffusers_and_sample_as_the_zoo(config, tmp_path):
    module = _config_model(config)
    files = write_diffusers_pipeline(module, tmp_path / "pipe")
    assert all(path.is_file() for path in files)
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    denoiser = "transformer" if "dit" in config else "unet"
    assert index[denoiser][0] == "diffusers" and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["scheduler"] == ["diffusers", "DPMSolverMultistepScheduler"]  # the config's sampler
    vae_config = json.loads((tmp_path / "pipe" / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] == pytest.approx(0.7)

    pipeline = DiffusionPipeline.from_pretrained(tmp_path / "pipe", trust_remote_code=True)
    assert type(pipeline) is ZooLatentDiffusionPipeline  # 12 classes: DiTPipeline's null class 1000 is wrong
    labels = [1, 5, 11]
    ours = _zoo_images(module, labels=labels)  # the config's guidance 3: the null class is used
    theirs = _pipeline_images(pipeline, class_labels=labels)
    assert abs(ours - theirs).max() <= IMAGE_TOLERANCE
    assert abs(ours[0] - ours[1]).max() > 1e-2  # the label matters: the comparison is not vacuous


def test_a_dit_of_1000_classes_is_a_stock_dit_pipeline(tmp_path):
    from diffusers import DiTPipeline

    module = _model(model_name="dit", model_kwargs=dict(TINY_DIT), num_classes=1000)
    write_diffusers_pipeline(module, tmp_path / "pipe")
    assert not (tmp_path / "pipe" / "pipeline.py").exists()
    pipeline = DiffusionPipeline.from_pretrained(tmp_path / "pipe")  # no custom code
    assert type(pipeline) is DiTPipeline
    labels = [3, 999]
    ours = _zoo_images(module, labels=labels)
    theirs = _pipeline_images(pipeline, class_labels=labels, guidance_scale=3.0, num_inference_steps=3)
    assert abs(ours - theirs).max() <= IMAGE_TOLERANCE

    # DiTPipeline does not seed the scheduler's steps: a stochastic sampler gets the zoo's pipeline
    stochastic = _model(
        model_name="dit",
        model_kwargs=dict(TINY_DIT),
        num_classes=1000,
        sampling=SamplingConfig(sampler="ddpm", steps=3),
    )
    write_diffusers_pipeline(stochastic, tmp_path / "ddpm")
    pipeline = DiffusionPipeline.from_pretrained(tmp_path / "ddpm", trust_remote_code=True)
    assert type(pipeline) is ZooLatentDiffusionPipeline
    ours, theirs = _zoo_images(stochastic, labels=labels), _pipeline_images(pipeline, class_labels=labels)
    assert abs(ours - theirs).max() <= IMAGE_TOLERANCE


def _tiny_clip(folder: Path) -> Path:
    """A local CLIP text encoder and tokenizer (letters only, no merges), as ``text_encoder_path`` takes."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder.mkdir()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        vocab.update({c + suffix: len(vocab) + i for i, c in enumerate(string.ascii_lowercase)})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=12
    ).save_pretrained(folder)
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=12,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    CLIPTextModel(config).save_pretrained(folder)
    return folder


VQ = {"model_name": "vq", "model_kwargs": {**TINY_AE["model_kwargs"], "num_vq_embeddings": 32}}
CAPTIONS = {"captions": ["a small blue square", "a large green circle"]}


@pytest.mark.parametrize(
    ("options", "prompts", "component"),
    [
        (
            {
                "conditioning": tiny_captions(),
                "sampling": SamplingConfig(steps=3, negative_prompt="a red circle"),
            },
            CAPTIONS,
            "conditioner",
        ),
        ({"conditioning": "clip"}, CAPTIONS, "text_encoder"),
        ({"conditioning": NoConditioning(dim=16)}, {"num_samples": 2}, "conditioner"),
        (
            {"autoencoder": None, "img_size": 8, "sampling": SamplingConfig(sampler="ddpm", steps=4)},
            {"labels": [0, 11]},
            "conditioner",
        ),
        (
            {
                "autoencoder": VQ,
                "objective": DiffusionObjective(
                    beta_schedule="cosine", prediction_type="v_prediction", rescale_zero_terminal_snr=True
                ),
                "sampling": SamplingConfig(sampler="ddim", steps=4, eta=0.5),
            },
            {"labels": [2, 3]},
            "conditioner",
        ),
    ],
    ids=["word-captions", "clip-captions", "unconditional", "pixel-space-ddpm", "vq-ddim-v-zero-snr"],
)
def test_other_conditionings_and_first_stages_sample_as_the_zoo(options, prompts, component, tmp_path):
    if options.get("conditioning") == "clip":
        options = {"conditioning": CaptionConditioning(text_encoder_path=str(_tiny_clip(tmp_path / "clip")))}
    module = _model(**options)
    write_diffusers_pipeline(module, tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index[component][0] is not None
    assert (index["vae"][0] is None) == (module.hparams.autoencoder is None)
    pipeline = ZooLatentDiffusionPipeline.from_pretrained(tmp_path / "pipe", trust_remote_code=True)
    names = {"labels": "class_labels", "captions": "prompt", "num_samples": "num_images"}
    ours = _zoo_images(module, **prompts)
    theirs = _pipeline_images(pipeline, **{names[k]: v for k, v in prompts.items()})
    assert abs(ours - theirs).max() <= IMAGE_TOLERANCE
    assert abs(ours[0] - ours[1]).max() > 1e-2


def test_lora_adapter_loads_onto_the_base_denoiser_in_diffusers(tmp_path):
    base = _config_model("base.yaml")
    torch.save({"state_dict": base.state_dict()}, tmp_path / "base.ckpt")
    lora = _config_model(
        "ldm_lora.yaml",
        f"--model.init_args.base_checkpoint={tmp_path / 'base.ckpt'}",
        "--model.init_args.lora.rank=4",
        "--model.init_args.lora.alpha=16",  # scale 4: the metadata must carry alpha, not just the rank
    )
    files = write_lora_adapter(lora, tmp_path / "lora")
    assert files == [tmp_path / "lora" / LORA_WEIGHT_NAME]
    with safe_open(str(files[0]), "pt") as weights:
        keys, metadata = list(weights.keys()), weights.metadata()
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert not any(k.startswith(("unet.", "model.", "base_model.")) for k in keys)
    config = json.loads(metadata["lora_adapter_metadata"])
    assert (config["r"], config["lora_alpha"]) == (4, 16)

    write_diffusers_pipeline(base, tmp_path / "base")
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "base" / "unet").eval()
    unet.load_lora_adapter(tmp_path / "lora", prefix=None, use_safetensors=True)
    x = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500, 999])
    cond = lora.conditioner(torch.tensor([1, 2, 12]))  # 12: the null class
    with torch.no_grad():
        ours = lora.predict(x, t, cond)
        theirs = denoise(unet, x, t, cond.context, cond.class_labels, cond.context_mask)
        without = base.predict(x, t, cond)
    assert (ours - theirs).abs().max() <= 1e-4
    assert (ours - without).abs().max() > 1e-2  # the adapter changes the output

    # the LoRA model's own pipeline folder has the adapter merged in
    write_diffusers_pipeline(lora, tmp_path / "merged")
    pipeline = DiffusionPipeline.from_pretrained(tmp_path / "merged", trust_remote_code=True)
    ours, theirs = _zoo_images(lora, labels=[1, 5]), _pipeline_images(pipeline, class_labels=[1, 5])
    assert abs(ours - theirs).max() <= IMAGE_TOLERANCE  # 6e-7 measured: merged weights round differently


def test_what_cannot_be_written_raises_a_zoo_error(tmp_path):
    with pytest.raises(ZooError, match="no LoRA adapter"):
        write_lora_adapter(_model(), tmp_path / "lora")
    with pytest.raises(ZooError, match="inpainting"):
        write_diffusers_pipeline(_model(inpainting=True), tmp_path / "inpainting")
    with pytest.raises(ZooError, match="scale_factor was never estimated"):
        write_diffusers_pipeline(_model(scale_factor=None), tmp_path / "unscaled")
    control = ControlNetDiffusion(
        autoencoder=dict(TINY_AE),
        scale_factor=0.7,
        img_size=16,
        model_kwargs=dict(TINY_UNET),
        conditioning=ClassConditioning(dim=16),
        num_classes=12,
    )
    with pytest.raises(ZooError, match="ControlNetDiffusion"):
        write_diffusers_pipeline(control, tmp_path / "control")
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_a_fresh_python_loads_the_folder_with_diffusion_pipeline(tmp_path):
    """The user's path: a process that imports only diffusers; the folder's pipeline.py imports the zoo."""
    write_diffusers_pipeline(_model(), tmp_path / "pipe")
    script = (
        "import sys, torch\n"
        "from diffusers import DiffusionPipeline\n"
        "try:\n"
        "    DiffusionPipeline.from_pretrained(sys.argv[1])\n"
        "except ValueError as error:\n"
        "    assert 'trust_remote_code' in str(error), error\n"
        "pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "images = pipe(class_labels=[1, 5], generator=torch.Generator().manual_seed(3), output_type='pt').images\n"
        "print(type(pipe).__name__, type(pipe.conditioner).__name__, tuple(images.shape))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "pipe")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ZooLatentDiffusionPipeline ZooConditioner (2, 3, 16, 16)" in result.stdout


def test_zoo_export_writes_the_diffusers_formats(tmp_path):
    """``zoo export --format diffusers | diffusers-lora`` goes through the module's ``library_exports``."""
    from zoo.export import export_model

    module = _model(lora=LoRAConfig(rank=2))
    offered = module.library_exports()
    if "diffusers" not in offered:
        pytest.skip("LatentDiffusion.library_exports() does not offer the diffusers formats yet")
    entries = export_model(module, tmp_path / "pipe", "diffusers")
    assert "model_index.json" in entries[0]["files"]
    entries = export_model(module, tmp_path / "lora", "diffusers-lora")
    assert entries[0]["files"] == [LORA_WEIGHT_NAME]
