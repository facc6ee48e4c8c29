"""DreamBooth's class images: samples of the plain class drawn once by the frozen starting model, cached on disk.

Prior preservation trains on the model's own pictures of the class beside the instance's, so that fine-tuning
on a few images does not redraw the whole class. They must come from the model *before* fine-tuning, and are
costly to draw (hundreds of full sampling runs), so they are drawn once and kept: the file is named by a hash
of everything that decides them (the model's weights, the classes, their number, the sampling part, the seed),
so a changed model or prompt draws new ones and an unchanged one reads the file. Writing goes through a
temporary file, so an interrupted run leaves no half-written cache.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch

__all__ = ["class_images", "prior_key"]

#: Images drawn per ``generate`` call.
CHUNK = 64


def prior_key(model, labels: list[int], num_images: int, seed: int) -> str:
    """sha256 of the starting model's weights (not LoRA adapters or added identifier rows, which start as no
    change or are never asked for) and of what is asked of it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" in name or name.endswith(".extra"):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    asked = {
        "labels": list(labels),
        "num_images": num_images,
        "seed": seed,
        "sampling": asdict(model.sampling),
    }
    digest.update(json.dumps(asked, sort_keys=True).encode())
    return digest.hexdigest()


@torch.no_grad()
def _draw(model, labels: list[int], num_images: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    wanted = torch.tensor([labels[i % len(labels)] for i in range(num_images)])
    images = []
    for i, chunk in enumerate(wanted.split(CHUNK)):
        drawn = model.generate(labels=chunk.tolist(), seed=seed + i)
        images.append(((drawn.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
    return torch.cat(images), wanted


def class_images(
    model, labels: list[int], num_images: int, cache_dir: str | Path, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(images uint8 (N, 3, H, W), labels (N,), key)``: ``num_images`` samples of ``labels`` (in turn) by
    ``model`` as it is now, read from ``cache_dir`` when drawn before, else drawn and written there."""
    from safetensors.torch import load_file, save_file

    key = prior_key(model, labels, num_images, seed)
    path = Path(cache_dir) / f"class_images-{key[:16]}.safetensors"
    if path.is_file():
        stored = load_file(str(path))
        return stored["images"], stored["labels"], key
    was_training = model.training
    model.eval()
    try:
        images, wanted = _draw(model, labels, num_images, seed)
    finally:
        model.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    save_file({"images": images.contiguous(), "labels": wanted}, str(temporary), metadata={"key": key})
    temporary.replace(path)
    return images, wanted, key
