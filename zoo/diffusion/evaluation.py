"""Conditional-generation accuracy: does a classifier recognise the class a model was asked for?

The measure behind the family's figure: ``samples_per_class`` images are generated for every class,
with a fixed seed, and a classifier trained by the vision family on the same embedded shapes
(``zoo.vision.ImageClassifier``; both use images in [-1, 1] and the same class order) labels them.
Accuracy is the share recognised as the requested class, overall and per class.

    python -m zoo.diffusion.evaluation --ldm runs/.../ldm.ckpt --classifier runs/.../classifier.ckpt \\
        --sampler dpmsolver++ --steps 25 --guidance 3.0 --samples-per-class 50
"""

from __future__ import annotations

import argparse
import json
import time

import torch

__all__ = ["conditional_accuracy", "load_classifier", "load_latent_diffusion"]


def load_latent_diffusion(path: str, use_ema: bool = True):
    """A ``LatentDiffusion`` checkpoint (or a ``ControlNetDiffusion``, ``DreamBooth``, ``TextualInversion`` one); with
    ``use_ema`` its ``zoo.callbacks.EMA`` weights."""
    from zoo.diffusion import (
        ControlNetDiffusion,
        DreamBooth,
        LatentDiffusion,
        TextualInversion,
        upgrade_checkpoint,
    )

    checkpoint = upgrade_checkpoint(torch.load(path, map_location="cpu", weights_only=True))
    hparams = checkpoint.get("hyper_parameters", {})
    # the subclasses that build more than LatentDiffusion does, told apart by an argument only they take
    kinds = {
        "control": ControlNetDiffusion,
        "class_labels": DreamBooth,
        "placeholder_token": TextualInversion,
    }
    cls = next((kind for argument, kind in kinds.items() if argument in hparams), LatentDiffusion)
    model = cls.load_from_checkpoint(path, map_location="cpu")
    has_ema = any(key.startswith("EMA") for key in checkpoint.get("callbacks", {}))
    if use_ema and has_ema:
        from zoo.callbacks import EMA

        ema = EMA.ema_state_dict(checkpoint)
        missing = [name for name, _ in model.named_parameters() if name not in ema]
        if missing:
            raise ValueError(
                f"{path}: the EMA state lacks {len(missing)} of the model's weights, e.g. {missing[:3]}"
            )
        model.load_state_dict(ema, strict=False)
    return model.eval()


def load_classifier(path: str):
    from zoo.vision import ImageClassifier

    return ImageClassifier.load_from_checkpoint(path, map_location="cpu").eval()


@torch.no_grad()
def conditional_accuracy(
    model,
    classifier,
    samples_per_class: int = 50,
    sampler: str = "dpmsolver++",
    steps: int = 25,
    guidance_scale: float = 3.0,
    seed: int = 0,
    batch_size: int = 120,
) -> dict:
    """``{"accuracy", "per_class", "seconds", ...}`` for a class-conditional model."""
    num_classes = model.hparams.num_classes
    labels = torch.arange(num_classes).repeat_interleave(samples_per_class)
    correct = torch.zeros(num_classes)
    start = time.perf_counter()
    for i, chunk in enumerate(labels.split(batch_size)):
        images = model.generate(
            labels=chunk.tolist(), sampler=sampler, steps=steps, guidance_scale=guidance_scale, seed=seed + i
        )
        predicted = classifier(images).argmax(-1).cpu()
        correct += torch.bincount(chunk[predicted == chunk], minlength=num_classes).float()
    per_class = (correct / samples_per_class).tolist()
    return {
        "accuracy": float(correct.sum() / len(labels)),
        "per_class": per_class,
        "min_class_accuracy": min(per_class),
        "sampler": sampler,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "samples": len(labels),
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="zoo evaluate-diffusion", description=__doc__.splitlines()[0])
    parser.add_argument("--ldm", required=True, help="LatentDiffusion checkpoint")
    parser.add_argument("--classifier", required=True, help="zoo.vision ImageClassifier checkpoint")
    parser.add_argument("--sampler", default="dpmsolver++")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, nargs="+", default=[3.0, 1.0])
    parser.add_argument("--samples-per-class", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ema", action="store_true")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    model, classifier = load_latent_diffusion(args.ldm, not args.no_ema), load_classifier(args.classifier)
    results = []
    for scale in args.guidance:
        result = conditional_accuracy(
            model, classifier, args.samples_per_class, args.sampler, args.steps, scale, args.seed
        )
        results.append(result)
        print(
            f"{args.sampler} {args.steps} steps, guidance {scale}: accuracy {result['accuracy']:.3f} "
            f"(worst class {result['min_class_accuracy']:.2f}, {result['samples']} samples, {result['seconds']:.0f} s)",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
