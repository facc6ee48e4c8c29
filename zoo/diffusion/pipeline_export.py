"""A trained ``LatentDiffusion`` as a diffusers pipeline folder, and its LoRA adapter as diffusers reads it.

``write_diffusers_pipeline`` writes the ``save_pretrained`` layout (``model_index.json`` plus one folder per
component): the denoiser (``unet/`` or ``transformer/``), the first stage (``vae/``: ``AutoencoderKL`` or
``VQModel``, with the zoo's latent scale as ``scaling_factor``), the sampler of the ``sampling`` part built on
the training schedule (``scheduler/``), and what turns a prompt into the denoiser's condition.

Which pipeline class the folder names:

- ``DiTPipeline`` (stock diffusers) for a class-conditional DiT with exactly 1000 classes and a deterministic
  sampler (DPM-Solver++, or DDIM with ``eta`` 0). ``DiTPipeline`` hard-codes the null class as 1000, so with
  any other class count its classifier-free guidance looks up a label the model does not have; and it calls
  ``scheduler.step`` without the generator, so a stochastic sampler would not reproduce a seed.
- ``ZooLatentDiffusionPipeline`` (below) otherwise: a UNet conditioned on classes needs the class token of the
  zoo's conditioner as its cross-attention input, which no stock pipeline computes; the zoo's word-level
  caption encoder and the unconditional token are zoo modules too. They are saved as one component,
  ``conditioner`` (``ZooConditioner``, a diffusers ``ModelMixin``); a frozen CLIP text encoder is saved as
  the stock ``text_encoder`` / ``tokenizer`` pair. The folder then holds ``pipeline.py``, one import of this
  module, and names it in ``model_index.json``, which is how diffusers finds a custom pipeline class:
  ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` loads it (so does
  ``ZooLatentDiffusionPipeline.from_pretrained`` with the same flag). The pipeline runs the zoo's own
  sampling loop (``zoo.diffusion.sampling``, diffusers' loop with guidance in one doubled batch and a seeded
  step), so it samples what ``LatentDiffusion.generate`` samples for the same seed.

A LoRA-fine-tuned model is written with its adapter merged into the denoiser (the folder then samples what
the zoo samples); ``write_lora_adapter`` writes the adapter alone, as diffusers' ``save_lora_adapter`` does
(peft key names without a prefix, the ``LoraConfig`` in the ``lora_adapter_metadata`` header), which
``denoiser.load_lora_adapter(folder, prefix=None)`` reads onto the base model's denoiser.

What cannot be written raises ``ZooError`` naming it: ControlNet models, inpainting models (their extra
input channels, a mask and the masked image's latents, have no pipeline here), a model whose latent scale
was never estimated, and a LoRA export of a model without an adapter.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

# ``ModelMixin`` and ``ConfigMixin`` are imported by name on purpose: diffusers loads a custom component by
# looking up its base classes *in the module that defines it* (``get_class_obj_and_candidates``).
from diffusers import ConfigMixin, DiffusionPipeline, DiTPipeline, DiTTransformer2DModel, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from zoo.diffusion.conditioning import (
    CaptionConditioner,
    ClassConditioner,
    Conditioning,
    UnconditionalConditioner,
)
from zoo.diffusion.model import FirstStage, denoise
from zoo.diffusion.sampling import guided, sample
from zoo.diffusion.schedules import build_sampler
from zoo.errors import ZooError

__all__ = [
    "LORA_WEIGHT_NAME",
    "ZooConditioner",
    "ZooLatentDiffusionPipeline",
    "write_diffusers_pipeline",
    "write_lora_adapter",
]

#: The adapter file diffusers' ``save_lora_adapter`` writes and ``load_lora_adapter`` looks for.
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: The file naming the custom pipeline class (diffusers imports it with ``trust_remote_code=True``).
PIPELINE_FILE = "pipeline.py"
_PIPELINE_SOURCE = '''"""The zoo's latent-diffusion pipeline (zoo.diffusion.pipeline_export); the lightning-zoo package must be installed."""

from zoo.diffusion.pipeline_export import ZooLatentDiffusionPipeline

__all__ = ["ZooLatentDiffusionPipeline"]
'''
#: The one null class id ``DiTPipeline`` uses for classifier-free guidance.
DIT_PIPELINE_NULL_CLASS = 1000


class ZooConditioner(ModelMixin, ConfigMixin):
    """The zoo's conditioner as a diffusers model: class token, word-level caption encoder or null token.

    It builds the very module ``LatentDiffusion`` uses (``zoo.diffusion.conditioning``) from its config, so the
    saved weights load under the same names and give the same context tokens.

    Args:
        kind: ``"class"`` (``ClassConditioner``: labels, null class ``num_classes``), ``"caption"``
            (``CaptionConditioner`` over the word ``vocabulary``) or ``"none"`` (``UnconditionalConditioner``).
        dim / num_classes / vocabulary / layers / heads / max_length: the conditioner's arguments.
    """

    @register_to_config
    def __init__(
        self,
        kind: str = "class",
        dim: int = 128,
        num_classes: int = 0,
        vocabulary: list[str] | None = None,
        layers: int = 2,
        heads: int = 4,
        max_length: int = 16,
    ) -> None:
        super().__init__()
        if kind == "class":
            self.conditioner = ClassConditioner(num_classes, dim)
        elif kind == "caption":
            self.conditioner = CaptionConditioner(vocabulary, dim, layers, heads, max_length)
        elif kind == "none":
            self.conditioner = UnconditionalConditioner(dim)
        else:
            raise ZooError(f"ZooConditioner kind must be 'class', 'caption' or 'none', got {kind!r}")

    def guidance_pair(self, labels, captions, negative_captions, n: int, device) -> tuple:
        """``(condition, unconditional)`` for ``n`` samples, as ``LatentDiffusion.generate`` builds them."""
        return self.conditioner.guidance_pair(labels, captions, negative_captions, n, device)


class ZooLatentDiffusionPipeline(DiffusionPipeline):
    """Class-, caption- or un-conditional latent diffusion with the zoo's sampling loop.

    Components: ``scheduler``; the denoiser, ``unet`` (``UNet2DConditionModel``) or ``transformer``
    (``DiTTransformer2DModel``, class labels only); ``vae`` (``AutoencoderKL`` / ``VQModel``; ``None`` for a
    pixel-space model); and the condition: ``conditioner`` (``ZooConditioner``) or ``text_encoder`` +
    ``tokenizer`` (CLIP), or nothing for a DiT (its label table holds the null class ``num_embeds_ada_norm``).
    The other arguments are the defaults of ``__call__`` (the zoo model's ``sampling`` part).
    """

    model_cpu_offload_seq = "text_encoder->conditioner->unet->transformer->vae"
    _optional_components = ["vae", "unet", "transformer", "conditioner", "text_encoder", "tokenizer"]

    def __init__(
        self,
        scheduler,
        vae=None,
        unet=None,
        transformer=None,
        conditioner=None,
        text_encoder=None,
        tokenizer=None,
        guidance_scale: float = 3.0,
        num_inference_steps: int = 25,
        eta: float = 0.0,
        negative_prompt: str = "",
    ) -> None:
        super().__init__()
        if (unet is None) == (transformer is None):
            raise ZooError("ZooLatentDiffusionPipeline needs exactly one denoiser: unet or transformer")
        self.register_modules(
            scheduler=scheduler,
            vae=vae,
            unet=unet,
            transformer=transformer,
            conditioner=conditioner,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
        )
        self.register_to_config(
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            eta=eta,
            negative_prompt=negative_prompt,
        )

    @property
    def denoiser(self):
        return self.unet if self.unet is not None else self.transformer

    def _encode_captions(self, captions: list[str], device) -> Conditioning:
        """CLIP context tokens and padding mask, as the zoo's frozen CLIP conditioner computes them."""
        tokens = self.tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt")
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device).bool()
        context = self.text_encoder(input_ids=ids).last_hidden_state
        return Conditioning(context=context, context_mask=mask.to(context.dtype))

    def _conditions(self, class_labels, prompt, negative_prompt, num_images, device) -> tuple:
        if isinstance(prompt, str):
            prompt = [prompt]
        if isinstance(class_labels, int):
            class_labels = [class_labels]
        given = class_labels if class_labels is not None else prompt
        n = len(given) if given is not None else num_images
        if not n:
            raise ValueError("give class_labels, prompt or num_images")
        if isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * n
        negative = negative_prompt or [self.config.negative_prompt] * n
        if self.text_encoder is not None:
            if prompt is None:
                raise ValueError("this pipeline is caption-conditional: give prompt")
            if len(negative) != n:
                raise ValueError(f"got {len(negative)} negative prompts for {n} prompts")
            return self._encode_captions(list(prompt), device), self._encode_captions(negative, device), n
        if self.conditioner is not None:
            cond, uncond = self.conditioner.guidance_pair(class_labels, prompt, negative, n, device)
            return cond, uncond, n
        # a DiT: its own label table, whose last row is the null class
        if class_labels is None:
            raise ValueError("this pipeline is class-conditional: give class_labels")
        null = int(self.transformer.config.num_embeds_ada_norm)
        labels = torch.as_tensor(class_labels, device=device).long().reshape(-1)
        if (labels < 0).any() or (labels >= null).any():
            raise ValueError(f"class_labels must be in [0, {null - 1}], got {labels.tolist()}")
        return Conditioning(class_labels=labels), Conditioning(class_labels=torch.full_like(labels, null)), n

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int] | int | None = None,
        prompt: list[str] | str | None = None,
        negative_prompt: list[str] | str | None = None,
        num_images: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        eta: float | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Images for ``class_labels`` (class models), ``prompt`` (caption models) or ``num_images``
        (unconditional); unset sampling arguments take the saved model's defaults. ``output_type``: ``"pil"``,
        ``"np"`` (NHWC in [0, 1]) or ``"pt"`` (NCHW in [0, 1])."""
        device = self._execution_device
        cond, uncond, n = self._conditions(class_labels, prompt, negative_prompt, num_images, device)
        denoiser = self.denoiser
        size = denoiser.config.sample_size
        shape = (n, denoiser.config.out_channels, size, size)

        def model_fn(x: torch.Tensor, t: torch.Tensor, c: Conditioning) -> torch.Tensor:
            return denoise(denoiser, x, t, c.context, c.class_labels, c.context_mask)

        scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        latents = sample(
            guided(model_fn, cond, uncond, scale),
            self.scheduler,
            shape,
            num_inference_steps=num_inference_steps or self.config.num_inference_steps,
            generator=generator,
            eta=self.config.eta if eta is None else eta,
            device=device,
            dtype=denoiser.dtype,
        )
        if self.vae is not None:
            images = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        else:
            images = latents
        images = (images / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


# ------------------------------------------------------------------------------------------------- writing
def _check_writable(module) -> float:
    """The latent scale of a model that can be written as a pipeline; ``ZooError`` naming what cannot."""
    from zoo.diffusion.controlnet import ControlNetDiffusion

    if isinstance(module, ControlNetDiffusion):
        raise ZooError(
            "a ControlNetDiffusion model is not written as a diffusers pipeline: its control is the zoo's edge "
            "map of an image and no pipeline here feeds it; export its base LatentDiffusion instead"
        )
    if module.hparams.inpainting:
        raise ZooError(
            "an inpainting LatentDiffusion (inpainting: true) is not written as a diffusers pipeline: its denoiser "
            "takes a mask and the masked image's latents as extra input channels, which no pipeline here supplies"
        )
    scale = float(module.scale_factor)
    if scale == 0.0:
        raise ZooError(
            "the model's latent scale_factor was never estimated (it is 0): load a trained checkpoint or pass "
            "--model.init_args.scale_factor, since the pipeline's vae needs it as scaling_factor"
        )
    return scale


def _plain_denoiser(model):
    """The denoiser without peft layers: the model itself, or a copy with its LoRA adapter merged in."""
    if not getattr(model, "_hf_peft_config_loaded", False):
        return model
    merged = copy.deepcopy(model)
    merged.fuse_lora()
    merged.unload_lora()
    return merged


def _stock_dit(module, denoiser, vae) -> bool:
    """Whether diffusers' own ``DiTPipeline`` samples exactly what the zoo samples with this model."""
    sampling = module.sampling
    deterministic = sampling.sampler == "dpmsolver++" or (sampling.sampler == "ddim" and sampling.eta == 0)
    return (
        isinstance(denoiser, DiTTransformer2DModel)
        and vae is not None
        and int(denoiser.config.num_embeds_ada_norm) == DIT_PIPELINE_NULL_CLASS
        and deterministic
    )


def _condition_components(module) -> dict:
    """The pipeline components that turn a prompt into the denoiser's condition."""
    conditioner = module.conditioner
    if isinstance(module.model, DiTTransformer2DModel):
        return {}  # the DiT's label table holds the classes and the null class
    if isinstance(conditioner, CaptionConditioner) and conditioner.clip is not None:
        return {"text_encoder": conditioner.clip.model, "tokenizer": conditioner.clip.tokenizer}
    config = module.conditioning
    if isinstance(conditioner, ClassConditioner):
        wrapped = ZooConditioner("class", conditioner.dim, num_classes=conditioner.num_classes)
    elif isinstance(conditioner, CaptionConditioner):
        wrapped = ZooConditioner(
            "caption",
            conditioner.dim,
            vocabulary=list(conditioner.tokenizer.vocabulary),
            layers=config.layers,
            heads=config.heads,
            max_length=conditioner.tokenizer.max_length,
        )
    elif isinstance(conditioner, UnconditionalConditioner):
        wrapped = ZooConditioner("none", conditioner.dim)
    else:
        raise ZooError(
            f"the conditioner {type(conditioner).__name__} has no diffusers equivalent here (class labels, "
            "captions and unconditional models are written)"
        )
    wrapped.conditioner.load_state_dict(conditioner.state_dict())
    return {"conditioner": wrapped.eval()}


def write_diffusers_pipeline(module, folder: Path) -> list[Path]:
    """Write ``module`` (a ``LatentDiffusion``) into ``folder`` as a diffusers pipeline; return the files.

    See the module docstring for the layout and the pipeline class; the folder loads with
    ``DiffusionPipeline.from_pretrained(folder)`` when it names ``DiTPipeline``, and with
    ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` when it names the zoo's pipeline
    (its ``pipeline.py`` imports this module, so the zoo must be installed where it is loaded).
    """
    folder = Path(folder)
    scale = _check_writable(module)
    denoiser = _plain_denoiser(module.model)
    vae = module.first_stage.autoencoder if isinstance(module.first_stage, FirstStage) else None
    scheduler = build_sampler(module.sampling.sampler, module.noise_scheduler)
    if _stock_dit(module, denoiser, vae):
        pipeline = DiTPipeline(transformer=denoiser, vae=vae, scheduler=scheduler)
    else:
        name = "transformer" if isinstance(denoiser, DiTTransformer2DModel) else "unet"
        sampling = module.sampling
        pipeline = ZooLatentDiffusionPipeline(
            scheduler=scheduler,
            vae=vae,
            **{name: denoiser},
            **_condition_components(module),
            guidance_scale=sampling.guidance_scale,
            num_inference_steps=sampling.steps,
            eta=sampling.eta,
            negative_prompt=sampling.negative_prompt,
        )
    folder.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(folder, safe_serialization=True)
    written = [folder / "model_index.json"]
    if vae is not None:  # the zoo's latent scale, which the pipelines divide the latents by before decoding
        config_file = folder / "vae" / "config.json"
        config = json.loads(config_file.read_text())
        config["scaling_factor"] = scale
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if isinstance(pipeline, ZooLatentDiffusionPipeline):
        (folder / PIPELINE_FILE).write_text(_PIPELINE_SOURCE)
        index_file = folder / "model_index.json"
        index = json.loads(index_file.read_text())
        index["_class_name"] = [Path(PIPELINE_FILE).stem, type(pipeline).__name__]
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(folder / PIPELINE_FILE)
    index = json.loads((folder / "model_index.json").read_text())
    for component, (library, _) in sorted((k, v) for k, v in index.items() if isinstance(v, list)):
        if not component.startswith("_") and library is not None:
            written += sorted(p for p in (folder / component).rglob("*") if p.is_file())
    return written


def write_lora_adapter(module, folder: Path) -> list[Path]:
    """Write the LoRA adapter of a LoRA-fine-tuned ``LatentDiffusion`` as diffusers' ``save_lora_adapter`` does.

    ``folder/pytorch_lora_weights.safetensors`` holds peft's key names with no prefix and the adapter's
    ``LoraConfig`` (rank, alpha, targets) in its ``lora_adapter_metadata`` header; load it onto the base
    model's denoiser with ``unet.load_lora_adapter(folder, prefix=None)`` (or ``transformer.``).
    """
    model = module.model
    if module.lora is None or "default" not in getattr(model, "peft_config", {}):
        raise ZooError(
            "the model has no LoRA adapter (its lora part is null): a diffusers LoRA file is written for a "
            "LoRA-fine-tuned LatentDiffusion (e.g. configs/diffusion/ldm_lora.yaml); export the model itself "
            "with --format diffusers"
        )
    folder = Path(folder)
    model.save_lora_adapter(folder, adapter_name="default", weight_name=LORA_WEIGHT_NAME)
    return [folder / LORA_WEIGHT_NAME]
