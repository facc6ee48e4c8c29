"""LoRA on the denoiser's attention projections (peft), kept apart from the base weights.

``zoo.lora.LoRAConfig`` says what an adapter is (rank, scale, dropout, which layers), for every family; its
``to_peft`` gives peft's ``LoraConfig`` with the denoiser's default layers. diffusers models
carry peft's adapter API (``add_adapter``); this module adds the two things a fine-tuning run needs around
it: which layers get adapters by default (the attention q/k/v/out projections, as diffusers' LoRA
script), and a small ``safetensors`` file holding only the adapter weights (kB to MB, not the whole
model) that can be loaded onto any copy of the same base model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from zoo.lora import LoRAConfig

__all__ = [
    "DEFAULT_TARGETS",
    "add_lora",
    "load_lora_weights",
    "lora_state_dict",
    "save_lora_weights",
]

#: The denoiser's attention projections (diffusers' names).
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def add_lora(model: nn.Module, config: LoRAConfig) -> None:
    """Add a trainable LoRA adapter to a diffusers model (Gaussian-initialised, as diffusers' LoRA script)."""
    peft_config = config.to_peft(DEFAULT_TARGETS, init_lora_weights="gaussian")
    model.add_adapter(peft_config)
    if not any("lora_" in name for name, _ in model.named_parameters()):
        raise ValueError(f"no module of the denoiser matches LoRA targets {peft_config.target_modules}")


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights, under peft's names (no ``.default`` adapter suffix)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def save_lora_weights(model: nn.Module, path: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(lora_state_dict(model), str(tmp))
    tmp.replace(path)
    return path


def load_lora_weights(model: nn.Module, path: str | Path) -> None:
    """Load adapter weights written by ``save_lora_weights`` into a model that already has the adapter."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA weights {str(path)!r} do not exist")
    if not any("lora_" in name for name, _ in model.named_parameters()):
        raise ValueError(
            "the model has no LoRA adapter: build it with a LoRAConfig (lora: {rank: ...}) before loading LoRA weights"
        )
    result = set_peft_model_state_dict(model, load_file(str(path)))
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"{str(path)!r} has weights this model's adapter lacks, e.g. {unexpected[:3]}")
