"""``zoo export`` for latent diffusion: the denoiser, decoder and caption encoder as graphs, each within 1e-4
of the eager model, and a plain scheduler loop around the exported graphs drawing what ``generate`` draws.

The models are tiny and their weights perturbed (DiT's adaLN-Zero and zero-initialised layers would otherwise
make every output 0, and every parity check trivially true). The ONNX runs and the other model kinds are
``slow`` (each ONNX export takes 10-30 s on one busy core)."""

from __future__ import annotations

import ast
import inspect
import json
import string
from pathlib import Path

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from tests.test_commands import zoo
from zoo.diffusion import (
    Autoencoder,
    CaptionConditioning,
    ControlNetDiffusion,
    LatentDiffusion,
    LoRAConfig,
    NoConditioning,
)
from zoo.diffusion import module as diffusion_module
from zoo.diffusion.module import caption_tokens
from zoo.diffusion.schedules import build_sampler
from zoo.export import ExportError, export_model

from ..conftest import CONFIGS
from .conftest import TINY_AE, TINY_DIT, tiny_captions

TOLERANCE = 1e-4


def perturbed(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return model.eval()


def exported(folder, entries, format: str) -> dict:
    """The graphs written into ``folder`` as callables on tensors, by graph name."""
    graphs = {}
    for entry in entries:
        assert max(entry["max_abs_difference"].values()) <= TOLERANCE, entry
        path = folder / entry["file"]
        graphs[entry["graph"]] = (program if format == "pt2" else session)(path, entry)
    return graphs


def single(outputs):
    outputs = tuple(outputs)
    return outputs[0] if len(outputs) == 1 else outputs


def program(path, entry):
    module = torch.export.load(path).module()
    return lambda *tensors: single(module(*tensors))


def session(path, entry):
    import onnxruntime

    runner = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name for i in runner.get_inputs()}  # an input the graph does not read is left out
    names = [i["name"] for i in entry["inputs"]]

    def run(*tensors):
        given = {name: t.numpy() for name, t in zip(names, tensors) if name in feeds}
        return single(torch.from_numpy(o) for o in runner.run(None, given))

    return run


def exported_sample(model: LatentDiffusion, graphs: dict, cond: dict, uncond: dict, n: int, seed: int):
    """Classifier-free guided sampling as a deployment writes it: diffusers' scheduler stepping in Python, the
    exported denoiser on the conditional and null inputs in one doubled batch, the exported decoder last."""
    sampling = model.sampling
    scheduler = build_sampler(sampling.sampler, model.noise_scheduler)
    scheduler.set_timesteps(sampling.steps)
    shape = (n, model.latent_channels, model.latent_size, model.latent_size)
    generator = torch.Generator().manual_seed(seed)
    latents = randn_tensor(shape, generator=generator) * scheduler.init_noise_sigma
    both = [torch.cat([cond[name], uncond[name]]) for name in cond]
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(latents, t)
        prediction = graphs["denoiser"](torch.cat([x, x]), t.repeat(2 * n), *both)
        conditional, null = prediction.chunk(2)
        guided = null + sampling.guidance_scale * (conditional - null)
        latents = scheduler.step(guided, t, latents).prev_sample
    return graphs["decoder"](latents)


def sample_class_model(model: LatentDiffusion, tmp_path, format: str) -> None:
    labels = [3, 0, 11]
    wanted = model.generate(labels=labels, seed=5)  # before export: with diffusers' own upsampling layers
    entries = export_model(model, tmp_path, format)
    assert [e["graph"] for e in entries] == ["denoiser", "decoder"]
    assert [i["name"] for i in entries[0]["inputs"]] == ["latents", "timesteps", "class_labels"]
    assert entries[0]["inputs"][0]["shape"][0] == "batch"
    graphs = exported(tmp_path, entries, format)
    if format == "pt2":  # each file holds the weights its graph reads, not the whole module's
        weights = torch.export.load(tmp_path / "denoiser.pt2").state_dict
        read = {**model.model.state_dict(), **model.conditioner.state_dict()}
        assert sum(w.numel() for w in weights.values()) == sum(w.numel() for w in read.values())
    cond = {"class_labels": torch.tensor(labels)}
    uncond = {"class_labels": torch.full((3,), model.conditioner.null_label)}
    images = exported_sample(model, graphs, cond, uncond, n=3, seed=5)
    assert (images - wanted).abs().max() <= TOLERANCE
    # no bound on the batch: diffusers' upsampling branches at 64 samples, the exported one does not
    latents = torch.randn(65, model.latent_channels, model.latent_size, model.latent_size)
    assert (graphs["decoder"](latents) - model.decode(latents)).abs().max() <= TOLERANCE


def test_a_loop_around_the_exported_class_model_draws_what_generate_draws(tiny_ldm_kwargs, tmp_path):
    sample_class_model(perturbed(LatentDiffusion(**tiny_ldm_kwargs)), tmp_path, "pt2")


@pytest.mark.slow
def test_the_onnx_class_model_draws_what_generate_draws(tiny_ldm_kwargs, tmp_path):
    sample_class_model(perturbed(LatentDiffusion(**tiny_ldm_kwargs)), tmp_path, "onnx")


@pytest.mark.parametrize("format", ["pt2", pytest.param("onnx", marks=pytest.mark.slow)])
def test_a_caption_model_exports_its_text_encoder_and_draws_what_generate_draws(
    tiny_ldm_kwargs, tmp_path, format
):
    model = perturbed(LatentDiffusion(**{**tiny_ldm_kwargs, "conditioning": tiny_captions()}))
    captions = ["a large red circle in the top left", "a small blue square"]
    wanted = model.generate(captions=captions, seed=2)
    entries = export_model(model, tmp_path, format)
    assert [e["graph"] for e in entries] == ["denoiser", "text_encoder", "decoder"]
    assert [i["name"] for i in entries[0]["inputs"]] == ["latents", "timesteps", "context", "context_mask"]
    graphs = exported(tmp_path, entries, format)

    def encoded(texts):  # the tokenizer in Python, the caption transformer exported
        context, mask = graphs["text_encoder"](*caption_tokens(model.conditioner, texts))
        return {"context": context, "context_mask": mask}

    images = exported_sample(model, graphs, encoded(captions), encoded(["", ""]), n=2, seed=2)
    assert (images - wanted).abs().max() <= TOLERANCE


def tiny_clip(folder: Path) -> str:
    """A local CLIP text encoder and tokenizer (letters only, no merges, 12 tokens), as ``text_encoder_path``
    takes."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder.mkdir()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        vocab.update({c + suffix: len(vocab) + i for i, c in enumerate(string.ascii_lowercase)})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=12)
    tokenizer.save_pretrained(folder)
    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=12, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    CLIPTextModel(config).save_pretrained(folder)
    return str(folder)


def model_of_kind(kind: str, kwargs: dict, tmp_path: Path) -> LatentDiffusion:
    if kind == "clip":
        clip = CaptionConditioning(text_encoder_path=tiny_clip(tmp_path / "clip"))
        return LatentDiffusion(**{**kwargs, "conditioning": clip})
    if kind == "controlnet":
        return ControlNetDiffusion(**kwargs)
    options = {
        "dit": {"model_name": "dit", "model_kwargs": dict(TINY_DIT)},
        "unconditional": {"conditioning": NoConditioning(dim=16)},
        "inpainting": {"inpainting": True, "scale_factor": 0.5},
        "lora": {"lora": LoRAConfig(rank=2)},
    }
    return LatentDiffusion(**{**kwargs, **options[kind]})


GRAPHS = {
    "dit": {"denoiser": ["latents", "timesteps", "class_labels"], "decoder": ["latents"]},
    "unconditional": {"denoiser": ["latents", "timesteps"], "decoder": ["latents"]},
    "inpainting": {
        "denoiser": ["latents", "timesteps", "class_labels"],
        "decoder": ["latents"],
        "encoder": ["images"],
    },
    "lora": {"denoiser": ["latents", "timesteps", "class_labels"], "decoder": ["latents"]},
    "controlnet": {"denoiser": ["latents", "timesteps", "class_labels", "control"], "decoder": ["latents"]},
    "clip": {
        "denoiser": ["latents", "timesteps", "context", "context_mask"],
        "text_encoder": ["token_ids", "token_mask"],
        "decoder": ["latents"],
    },
}


@pytest.mark.slow
@pytest.mark.parametrize("format", ["pt2", "onnx"])
@pytest.mark.parametrize("kind", list(GRAPHS))
def test_every_kind_of_model_exports_within_tolerance(tiny_ldm_kwargs, tmp_path, kind, format):
    model = perturbed(model_of_kind(kind, tiny_ldm_kwargs, tmp_path))
    entries = export_model(model, tmp_path / "exported", format)
    assert {e["graph"]: [i["name"] for i in e["inputs"]] for e in entries} == GRAPHS[kind]
    for entry in entries:
        assert max(entry["max_abs_difference"].values()) <= TOLERANCE, entry


@pytest.mark.parametrize(
    ("name", "format"),
    [
        ("kl", "pt2"),
        *(
            pytest.param(n, f, marks=pytest.mark.slow)
            for n, f in [("kl", "onnx"), ("vq", "pt2"), ("vq", "onnx")]
        ),
    ],
)
def test_the_autoencoder_exports_its_encoder_and_decoder(tmp_path, name, format):
    kwargs = {**TINY_AE["model_kwargs"], "num_vq_embeddings": 32}
    model = Autoencoder(model_name=name, model_kwargs=kwargs, img_size=16, loss={"perceptual_weight": 0.0})
    perturbed(model)
    if name == "vq":  # a trained codebook's spread: an untrained one's codes all sit within 1/32 of 0
        with torch.no_grad():
            model.model.autoencoder.quantize.embedding.weight.normal_()
    images = model.example_inputs(3)[0]
    wanted = model(images)
    entries = export_model(model, tmp_path, format)
    assert [(e["graph"], e["inputs"][0]["shape"]) for e in entries] == [
        ("encoder", ["batch", 3, 16, 16]),
        ("decoder", ["batch", 4, 4, 4]),
    ]
    graphs = exported(tmp_path, entries, format)
    assert (graphs["decoder"](graphs["encoder"](images)) - wanted).abs().max() <= TOLERANCE


def test_diffusers_formats_are_offered_and_their_writer_imported_only_when_asked_for(
    tiny_ldm_kwargs, tmp_path
):
    model = LatentDiffusion(**tiny_ldm_kwargs)
    assert sorted(model.library_exports()) == ["diffusers", "diffusers-lora"]
    (entry,) = export_model(model, tmp_path, "diffusers")
    assert entry["format"] == "diffusers" and "model_index.json" in entry["files"]
    tree = ast.parse(inspect.getsource(diffusion_module))
    imported = [ast.unparse(node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert imported and not any("pipeline_export" in line for line in imported)


def test_a_model_whose_latent_scale_was_never_estimated_is_refused_by_name(tiny_ldm_kwargs, tmp_path):
    model = LatentDiffusion(**{**tiny_ldm_kwargs, "scale_factor": None})
    with pytest.raises(ExportError, match="scale_factor, which was never estimated"):
        export_model(model, tmp_path, "pt2")


TINY_CONFIG = [
    "--config", str(CONFIGS / "diffusion" / "ldm_unet_caption.yaml"),
    f"--model.init_args.autoencoder={json.dumps(TINY_AE)}",
    "--model.init_args.model_kwargs={block_out_channels: [16, 32], norm_num_groups: 8, attention_head_dim: 2}",
    "--model.init_args.conditioning.init_args.dim=16", "--model.init_args.conditioning.init_args.layers=1",
    "--model.init_args.scale_factor=0.5", "--data.init_args.img_size=16",
]  # fmt: skip


@pytest.mark.slow
def test_zoo_export_writes_the_graphs_of_a_config_and_their_signatures(tmp_path):
    result = zoo(
        "export", *TINY_CONFIG, "--format", "onnx", "--output", "exported", cwd=tmp_path, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "exported" / "export.json").read_text())
    graphs = {g["graph"]: g for g in manifest["graphs"]}
    assert sorted(graphs) == ["decoder", "denoiser", "text_encoder"]
    token_ids = {"name": "token_ids", "dtype": "int64", "shape": ["batch", 12]}  # the config's max_length
    assert graphs["text_encoder"]["inputs"][0] == token_ids
    assert graphs["decoder"]["outputs"][0]["traced_shape"] == [2, 3, 16, 16]
    assert all(max(g["max_abs_difference"].values()) <= TOLERANCE for g in graphs.values())
